"""Near-duplicate search over 64-bit perceptual hashes without comparing all pairs.

Similarity is 1 - hamming/64, so `similarity >= s` means `hamming <= d` with d = floor(64 (1-s)).
Multi-index hashing: cut the hash into d+1 blocks; by pigeonhole two hashes within distance d
agree exactly on at least one block. Each block has a table block value -> kept hashes, so a
query only compares against hashes sharing a block (then checks the true distance, vectorised).
With uniform hashes a query sees about (d+1) * N / 2^(64/(d+1)) candidates: at s = 0.95 (d = 3,
16-bit blocks) and N = 5 M that is ~300 comparisons, so the whole pass is linear in N. Real data
clusters (video frames), which only makes the matching buckets hold what we want to find.
Below s ~ 0.9 the blocks get short and the tables degrade towards a linear scan; that regime
is not a near-duplicate filter any more.
"""
from __future__ import annotations

import numpy as np


def max_distance(similarity: float) -> int:
    return int(np.floor(64 * (1.0 - similarity) + 1e-9))


class NearDuplicateIndex:
    """Greedy filter: `add(h)` returns the id of a kept hash within the distance, or None after
    keeping `h`. Feeding items in a fixed order makes the result deterministic."""

    def __init__(self, similarity: float):
        self.d = max_distance(similarity)
        nblocks = min(self.d + 1, 64)
        edges = np.linspace(0, 64, nblocks + 1).round().astype(int)
        self._blocks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._blocks]
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self._ids: list[int] = []

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, h: int, item_id: int) -> int | None:
        parts = [(h >> lo) & mask for lo, mask in self._blocks]
        candidates: list[int] = []
        for table, part in zip(self._tables, parts):
            bucket = table.get(part)
            if bucket:
                candidates.extend(bucket)
        if candidates:
            idx = np.unique(np.asarray(candidates, dtype=np.int64))
            dist = np.bitwise_count(self._hashes[idx] ^ np.uint64(h))
            hit = np.flatnonzero(dist <= self.d)
            if hit.size:
                return self._ids[int(idx[hit[0]])]
        pos = len(self._ids)
        if pos == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._hashes[pos] = np.uint64(h)
        self._ids.append(item_id)
        for table, part in zip(self._tables, parts):
            table.setdefault(part, []).append(pos)
        return None
