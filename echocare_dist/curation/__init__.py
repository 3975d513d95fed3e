"""echocare_dist.curation: ultrasound collections -> WebDataset shards (SPEC 6).

`build_shards` (builder.py) runs the pipeline, `verify_shards` (verify.py) checks a result,
report.py summarizes and draws contact sheets; the shard format itself is echocare_dist.shardfmt."""
from .builder import CurationError, build_shards
from .mapping import MappingError, load_mappings
from .verify import ShardVerifyError, VerifyReport, verify_shards

__all__ = ["build_shards", "verify_shards", "VerifyReport", "ShardVerifyError", "CurationError",
           "MappingError", "load_mappings"]
