"""Pretraining data: DALI loader (GPU or CPU), its webdataset-format fallback, SimMIM masks, resume.

`build_loader(cfg, ontology, rank=, world_size=, device=, run_dir=)` returns a `PretrainLoader`:
an infinite iterator of batches (see loader.py for the contract and the resume semantics).
"""
from .loader import PretrainLoader, build_loader, dali_available, resolve_loader_kind
from .masking import MaskGenerator
from .shards import DataLoaderError, ShardError

__all__ = ["PretrainLoader", "build_loader", "dali_available", "resolve_loader_kind", "MaskGenerator", "DataLoaderError", "ShardError"]
