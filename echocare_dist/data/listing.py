"""The sample list of one epoch: which (shard, sample) sits at each global position.

Positions 0..N-1 number the epoch's samples in the epoch's tar order. Every rank of every world
size agrees on this numbering, which is what lets a resume on another world size say exactly which
samples an interrupted epoch has consumed (the loader state records positions, see resume.py).

Two forms:
- natural: every sample of the epoch's tars once, tar after tar (no mixture). Held as the tars'
  cumulative sizes only, so it costs nothing for any data set size.
- explicit: arrays of (shard, sample, copy) per position, as a per-source mixture draws them
  (mixture.py): a sample may be missing or appear several times (copy 0, 1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class EpochList:
    shards: tuple            # the epoch's tar order (shards.Shard), what shard ordinals index
    shard_of: np.ndarray | None = None   # int32 (N,) shard ordinal per position; None: natural
    index: np.ndarray | None = None      # int64 (N,) sample index in its shard
    copy: np.ndarray | None = None       # int32 (N,) 0 for a sample's first occurrence in the epoch

    @classmethod
    def natural(cls, shards: Sequence) -> "EpochList":
        return cls(tuple(shards))

    @property
    def is_natural(self) -> bool:
        return self.shard_of is None

    @property
    def starts(self) -> np.ndarray:
        """Position of each shard's first sample in the natural list (and the total at the end)."""
        return np.concatenate([[0], np.cumsum([s.samples for s in self.shards], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.is_natural else int(len(self.shard_of))

    def refs(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ordinals, sample indices) at `positions`."""
        positions = np.asarray(positions, np.int64)
        if not self.is_natural:
            return self.shard_of[positions].astype(np.int64), self.index[positions]
        starts = self.starts
        ordinal = np.searchsorted(starts, positions, side="right") - 1
        return ordinal, positions - starts[ordinal]

    def copies(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        if self.is_natural:
            return np.zeros(len(positions), np.int32)
        return self.copy[positions]

    def positions_of_shards(self, names: set[str]) -> np.ndarray:
        """Bool (N,): whether each position reads one of the shards `names`."""
        hit = np.array([s.name in names for s in self.shards], bool)
        if self.is_natural:
            return np.repeat(hit, [s.samples for s in self.shards])
        return hit[self.shard_of] if len(hit) else np.zeros(0, bool)


def ranges_from_positions(positions: np.ndarray) -> list[list[int]]:
    """Sorted unique positions as [[first, end), ...] runs: compact for the near-prefix sets that
    consumed samples form (a prefix plus the shuffle buffer's holes)."""
    p = np.unique(np.asarray(positions, np.int64))
    if not len(p):
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    firsts = np.concatenate([[p[0]], p[breaks]])
    lasts = np.concatenate([p[breaks - 1], [p[-1]]]) + 1
    return [[int(a), int(b)] for a, b in zip(firsts, lasts)]


def positions_from_ranges(ranges, where: str = "loader state") -> np.ndarray:
    """The inverse of `ranges_from_positions` (ValueError naming `where` on a malformed run)."""
    parts = []
    for run in ranges or ():
        if not (isinstance(run, (list, tuple)) and len(run) == 2 and 0 <= int(run[0]) <= int(run[1])):
            raise ValueError(f"{where}: malformed position range {run!r} (expected [first, end))")
        parts.append(np.arange(int(run[0]), int(run[1]), dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class PositionLookup:
    """Key -> epoch position for a reader that returns keys only (DALI): built from the positions it
    reads; a key listed several times (a mixture's repeats) yields its positions in list order, and
    a key read more often than listed (a rebuilt pipeline starting over) yields -1."""

    def __init__(self, keys: Sequence[str], positions: np.ndarray, consumed: np.ndarray | None = None):
        self._queue: dict[str, list[int]] = {}
        for key, pos in zip(keys, np.asarray(positions, np.int64).tolist()):
            if consumed is None or not consumed[pos]:   # read before a resume: not to be read again
                self._queue.setdefault(key, []).append(pos)
        for q in self._queue.values():
            q.reverse()   # pop() from the end takes them in list order

    def take(self, keys: Sequence[str]) -> np.ndarray:
        out = np.full(len(keys), -1, np.int64)
        for j, key in enumerate(keys):
            q = self._queue.get(key)
            if q:
                out[j] = q.pop()
        return out
