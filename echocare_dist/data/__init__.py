"""Pretraining data: DALI reader (GPU or CPU) and its PIL fallback, SimMIM masks, exact resume, quarantine.

`build_loader(cfg, ontology, rank=, world_size=, device=, run_dir=)` returns a `PretrainLoader`:
an infinite iterator of batches (see loader.py for the contract and the resume semantics). The
trainer relies only on `PretrainLoaderProtocol` (contracts.py).
"""
from .contracts import PretrainLoaderProtocol, RawBatch, Reader
from .loader import PretrainLoader
from .masking import MaskGenerator
from .placement import dali_available
from .registry import READERS, build_loader, resolve_loader_kind
from .shards import DataLoaderError, ShardError

__all__ = ["PretrainLoader", "PretrainLoaderProtocol", "Reader", "RawBatch", "READERS", "build_loader",
           "dali_available", "resolve_loader_kind", "MaskGenerator", "DataLoaderError", "ShardError"]
