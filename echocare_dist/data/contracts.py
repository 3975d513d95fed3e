"""The two contracts of the pretraining data path.

    reader (DALI pipeline or PIL workers) --RawBatch--> PretrainLoader (epoch cursor, batch finishing)
        --batch dict--> trainer

A `Reader` turns one rank's epoch plan into raw batches and knows how to resume inside an epoch;
`PretrainLoader` (loader.py) decides which epoch and step come next and finishes the batches.
The trainer only relies on `PretrainLoaderProtocol`, which any batch source can implement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from ..config import DEPRECATED_VALUES
from .augment import AugmentParams
from .quarantine import QuarantinePolicy
from .shards import EpochPlan, ShardSet

# Loader names that were renamed -> their current name. Loader states saved under the old name stay
# resumable; configs that still use it get a deprecation warning.
RENAMED_KINDS = DEPRECATED_VALUES["data.loader"]  # the PIL fallback never used the webdataset package


class RawBatch(NamedTuple):
    images: torch.Tensor                 # uint8 (B, 1, H, W): reader steps 1-2 of augment.py done
    jitter: torch.Tensor                 # float32 (B, 2): (brightness, contrast) for augment.apply_jitter
    labels: np.ndarray | torch.Tensor    # int8 (B, C)
    keys: list[str]
    # int64 (B,) each sample's position in the epoch's list (listing.py), -1 for a sample read again
    # (a stream's wrap-around, a rebuilt pipeline); None: the loader looks the keys up.
    positions: np.ndarray | None = None
    copies: np.ndarray | None = None     # int32 (B,) repeat number under a mixture (None: all 0)


@dataclass(frozen=True)
class ReaderContext:
    """What a reader needs from the loader that owns it: fixed for the loader's lifetime."""
    cfg: Any                             # the run's Config
    shard_set: ShardSet
    quarantine: QuarantinePolicy         # where the reader reports damage and reads what to skip
    rank: int
    world_size: int
    device: torch.device                 # the training device
    micro_batch: int
    num_classes: int
    aug: AugmentParams
    # The positions of the current epoch this rank has already returned (bool per position, None:
    # none yet): a reader that maps keys to positions must not hand out a consumed one again.
    consumed: Callable[[], np.ndarray | None] = lambda: None


@runtime_checkable
class Reader(Protocol):
    """One rank's raw batches of one epoch at a time. Built with a `ReaderContext`."""

    kind: str   # the loader's name in data.loader and in loader states ("dali", "pil")

    def describe(self) -> str: ...

    def start(self, plan: EpochPlan, position: int, state: dict | None) -> int:
        """Start reading `plan` so that the next batch is batch `position` of the epoch, from a
        `state()` saved at that position when given. Returns the position it could start at
        (0 when the saved state could not be restored: the epoch starts over)."""

    def next_batch(self, position: int) -> RawBatch:
        """Batch `position` of the started epoch (positions come in order)."""

    def state(self) -> dict:
        """While started: what `start` needs to continue after the last batch returned."""

    def compatible(self, state: dict | None) -> bool:
        """Whether a `state()` saved by this kind of reader continues exactly with these settings."""

    def stop(self) -> None: ...


@runtime_checkable
class PretrainLoaderProtocol(Protocol):
    """What the trainer relies on: an infinite iterator of batches (docs/architecture.md, "Batch")
    with a resumable position and damage counters for the metrics."""

    @property
    def epoch(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def bad_samples(self) -> int:
        """Damaged samples skipped so far by this rank (a sample counts once)."""

    @property
    def quarantined(self) -> list[str]:
        """Shard names left out of the current epoch."""

    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def resume(self, states: list[dict]) -> None:
        """Continue from every rank's `state_dict()` of a checkpoint, on any world size (data/resume.py)."""

    def close(self) -> None: ...
