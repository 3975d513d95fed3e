"""Which reader a run's loader uses (`data.loader`), and building the loader with it."""
from __future__ import annotations

import logging
import os
import warnings

import torch

from .contracts import RENAMED_KINDS
from .dali_loader import DaliReader
from .loader import PretrainLoader
from .pil_loader import PilReader
from .placement import dali_available, decode_on_gpu
from .shards import DataLoaderError

log = logging.getLogger(__name__)

READERS = {"dali": DaliReader, "pil": PilReader}


def loader_kind(name: str) -> str:
    """`name` as a key of READERS. A renamed kind ("wds") is accepted with the FutureWarning that
    load_config gives (it is a config value, so the warning is meant for users, not developers)."""
    if name in RENAMED_KINDS:
        new = RENAMED_KINDS[name]
        warnings.warn(f"data.loader={name!r} is deprecated, use data.loader={new!r}", FutureWarning, stacklevel=3)
        return new
    if name not in READERS:
        raise DataLoaderError(f"data.loader={name!r}: unknown loader; the loaders are {', '.join(READERS)} "
                              f"(data.loader=auto picks one)")
    return name


def resolve_loader_kind(cfg, device) -> str:
    """`data.loader`; "auto" = DALI when it can decode on the GPU, else the PIL fallback.

    On CPU the fallback is the cheaper of the two (benchmarks/loader.py: DALI's CPU decode is faster
    than PIL's, but its antialiased CPU resize costs ~2.7 ms per 640x480 image against ~0.4 ms)."""
    if cfg.data.loader != "auto":
        return loader_kind(cfg.data.loader)
    on_gpu = decode_on_gpu(cfg.data, device) and torch.cuda.is_available()
    return "dali" if on_gpu and dali_available() else "pil"


def build_loader(cfg, ontology, *, rank: int, world_size: int, device,
                 run_dir: str | os.PathLike | None) -> PretrainLoader:
    """The pretraining loader of `cfg.data.loader` (see `resolve_loader_kind` for "auto")."""
    kind = resolve_loader_kind(cfg, device)
    if kind == "dali" and not dali_available():
        raise DataLoaderError("data.loader=dali but nvidia-dali is not installed; use data.loader=pil or auto")
    loader = PretrainLoader(cfg, ontology, READERS[kind], rank=rank, world_size=world_size, device=device,
                            run_dir=run_dir)
    log.info("rank %d/%d: %s loader over %d shards (%d samples, %d quarantined), %d steps per epoch of "
             "micro-batch %d", rank, world_size, loader.describe(), len(loader.shard_set.shards),
             loader.plan.total, len(loader.quarantined), loader.steps_per_epoch, loader.micro_batch)
    return loader
