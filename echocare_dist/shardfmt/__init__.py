"""echocare_dist.shardfmt: the shard format, the one contract between the builder and the loaders.

A shard directory (manifest.py) holds GNU tars of samples (tar.py), each with its DALI index
(index.py), and a manifest; a sample is jpg + lbl + json under one key (sample.py). Everything
that writes or reads shards goes through here; this package imports nothing of data/ or curation/.
"""
from .index import INDEX_VERSION, INDEX_VERSIONS, IndexedSample, index_lines, index_text, read_index, write_index
from .manifest import (MANIFEST, MANIFEST_FORMAT, SHARD_RE, Manifest, ShardEntry, keys_digest,
                       shard_name)
from .sample import (CHECKSUM_KEY, PROVENANCE_KEYS, SAMPLE_EXTS, SAMPLE_KEY_RE, SampleError, ShardError,
                     check_key, checksum_problem, jpg_checksum, split_name)
from .tar import TAR_BLOCK, TAR_RECORD, ShardReader, ShardWriter, parse_member_header, tar_member_bytes

__all__ = ["INDEX_VERSION", "INDEX_VERSIONS", "IndexedSample", "index_lines", "index_text", "read_index",
           "write_index", "MANIFEST", "MANIFEST_FORMAT", "SHARD_RE", "Manifest", "ShardEntry", "keys_digest",
           "shard_name", "CHECKSUM_KEY", "checksum_problem", "jpg_checksum", "PROVENANCE_KEYS", "SAMPLE_EXTS",
           "SAMPLE_KEY_RE", "SampleError", "ShardError", "check_key", "split_name", "TAR_BLOCK", "TAR_RECORD", "ShardReader", "ShardWriter",
           "parse_member_header", "tar_member_bytes"]
