"""The shard set a loader reads (checked against the run's ontology) and the per-epoch sample plan.

Both loaders (DALI and the webdataset-format fallback) take their epoch layout from `make_plan`,
so they split the data the same way:

1. the tar order of epoch e is a permutation seeded by (data.seed, e, world size): identical on
   every rank, different every epoch (the builder already shuffled samples across tars);
2. samples, numbered across the tars in that order, are cut into `world_size` contiguous ranges
   [N*r//W, N*(r+1)//W): exactly DALI's `shard_id` / `num_shards` split, so the ranks' samples are
   disjoint and together complete;
3. every rank runs floor(floor(N/W) / micro_batch) steps, the count of the smallest range, so no rank
   runs out while another waits for it in a collective. At most W*micro_batch-1 samples per epoch
   (plus the last partial batch of each range) are left out, a different few each epoch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..shardfmt import MANIFEST, Manifest, SampleError, ShardError, ShardReader, checksum_problem, read_index

__all__ = ["ShardSet", "ShardIndex", "TarReader", "Shard", "EpochPlan", "Segment", "make_plan", "epoch_order",
           "buffer_shuffle", "derive_seed", "DataLoaderError", "ShardError", "SampleError"]


class DataLoaderError(RuntimeError):
    """The loader cannot go on (e.g. too many damaged shards); the message says what to look at."""


def derive_seed(*parts, bits: int = 31) -> int:
    """A stable seed from any printable parts (same value on every machine and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << bits)


# --------------------------------------------------------------------------------------------
# Shards and their DALI index files
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    name: str        # file name of the tar, the identity used in the manifest and the quarantine
    tar: Path
    idx: Path
    samples: int
    bytes: int       # size the builder recorded; a different size on disk means a damaged copy


@dataclass(frozen=True)
class ShardIndex:
    """One tar's samples as its DALI index lists them (shardfmt.read_index), in the loaders' form:
    keys, and (offset, size) of jpg, lbl and json as arrays."""
    keys: tuple[str, ...]
    jpg: np.ndarray   # int64 (n, 2)
    lbl: np.ndarray   # int64 (n, 2); size -1 when the sample has no .lbl
    prov: np.ndarray | None = None  # int64 (n, 2) of the .json (provenance); size -1 when it has none

    @classmethod
    def read(cls, path: Path) -> "ShardIndex":
        path = Path(path)
        keys, jpg, lbl, prov = [], [], [], []
        for key, comps, line in read_index(path):
            if "jpg" not in comps:
                raise ShardError(f"{path}:{line}: sample {key!r} has no .jpg component")
            # A v1.1 index names no members: the position stands in for the key.
            keys.append(key if key is not None else f"{path.stem}#{len(keys)}")
            jpg.append(comps["jpg"])
            lbl.append(comps.get("lbl", (0, -1)))
            prov.append(comps.get("json", (0, -1)))
        return cls(tuple(keys), *(np.asarray(a, np.int64).reshape(-1, 2) for a in (jpg, lbl, prov)))

    @property
    def end(self) -> int:
        """First byte after the last component: the tar must be at least this long."""
        ends = [self.jpg.sum(1).max(initial=0)]
        if (self.lbl[:, 1] >= 0).any():
            ends.append(self.lbl.sum(1).max())
        return int(max(ends))


class ShardSet:
    """The shard directory as the manifest describes it, checked against the run's ontology."""

    def __init__(self, root: Path, shards: Sequence[Shard], num_classes: int, ontology_hash: str):
        self.root = root
        self.shards = tuple(shards)
        self.by_name = {s.name: s for s in self.shards}
        self.num_classes = num_classes
        self.ontology_hash = ontology_hash
        self._resolved = {}

    @classmethod
    def open(cls, root: str | os.PathLike, ontology) -> "ShardSet":
        root = Path(root)
        if not str(root) or not root.is_dir():
            raise ShardError(f"data.shards={str(root)!r} is not a directory of shards")
        mpath = root / MANIFEST
        manifest = Manifest.read(root)
        got = manifest.ontology_hash
        if got != ontology.hash:
            raise ShardError(f"{mpath}: ontology_hash {got!r} differs from the run's ontology {ontology.hash!r} "
                             f"({len(ontology)} nodes): these shards were labelled with another ontology; "
                             f"rebuild them or point ontology.path at the one they were built with")
        if manifest.ontology_nodes != len(ontology):
            raise ShardError(f"{mpath}: ontology_nodes={manifest.ontology_nodes} but the ontology has "
                             f"{len(ontology)} nodes")
        if not manifest.shards:
            raise ShardError(f"{mpath}: 'shards' is empty: the build kept no sample (see 'rejected')")
        shards = [Shard(e.name, root / e.name, (root / e.name).with_suffix(".idx"), e.samples, e.bytes)
                  for e in manifest.shards if e.samples > 0]  # an empty tar carries nothing to read
        if not shards:
            raise ShardError(f"{mpath}: no shard holds any sample")
        return cls(root, shards, len(ontology), ontology.hash)

    def shard_of_path(self, path: str) -> Shard | None:
        """The shard a tar or index path (as DALI prints it) belongs to."""
        if not self._resolved:
            for s in self.shards:
                for p in (s.tar, s.idx):
                    self._resolved[str(p)] = s
                    with contextlib.suppress(OSError):
                        self._resolved[str(p.resolve())] = s
        return self._resolved.get(path) or self.by_name.get(Path(path).with_suffix(".tar").name)

    def preflight(self, shards: Iterable[Shard]) -> dict[str, str]:
        """Damage visible without reading the data: missing files, a tar of the wrong size.

        Costs one stat per file, so it runs at every epoch start. A truncated tar must never reach
        DALI: with mmap a read past the end kills the process (SIGBUS), without it the reader dies."""
        bad = {}
        for s in shards:
            if not s.tar.is_file():
                bad[s.name] = f"tar {s.tar} is missing"
            elif not s.idx.is_file():
                bad[s.name] = f"index {s.idx} is missing"
            else:
                size = s.tar.stat().st_size
                if size != s.bytes:
                    bad[s.name] = f"tar {s.tar} has {size} bytes, the manifest recorded {s.bytes} (truncated or replaced)"
        return bad


class TarReader:
    """Samples of any shard of the set as (jpg, label vector): one shardfmt.ShardReader and one
    parsed index per shard, so reading a sample is one seek + two reads, and skipping one costs nothing."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._readers: dict[str, ShardReader] = {}
        self._indexes: dict[str, ShardIndex] = {}

    def index(self, shard: Shard) -> ShardIndex:
        idx = self._indexes.get(shard.name)
        if idx is None:
            idx = self._indexes[shard.name] = ShardIndex.read(shard.idx)
        return idx

    def key(self, shard: Shard, i: int) -> str:
        return self.index(shard).keys[i]

    def _read(self, shard: Shard, offset: int, size: int, what: str) -> bytes:
        reader = self._readers.get(shard.name)
        if reader is None:
            reader = self._readers[shard.name] = ShardReader(shard.tar, shard.idx)
        return reader.read_at(offset, size, what)

    def read(self, shard: Shard, i: int) -> tuple[bytes, np.ndarray]:
        """(jpg bytes, int8 label vector of length C) of sample i, or SampleError."""
        idx = self.index(shard)
        key = idx.keys[i]
        jpg = self._read(shard, *map(int, idx.jpg[i]), what=f"{shard.name}/{key}.jpg")
        off, size = map(int, idx.lbl[i])
        if size < 0:
            raise SampleError(f"{shard.name}/{key} has no .lbl component")
        if size != self.num_classes:
            raise SampleError(f"{shard.name}/{key}.lbl has {size} bytes, the ontology has {self.num_classes} nodes")
        lbl = np.frombuffer(self._read(shard, off, size, what=f"{shard.name}/{key}.lbl"), np.int8).copy()
        return jpg, lbl

    def check_checksum(self, shard: Shard, i: int, jpg: bytes) -> None:
        """SampleError unless `jpg` (sample i's .jpg as read) matches the checksum in its .json
        (data.verify_samples; shardfmt.CHECKSUM_KEY): one more small read per sample."""
        idx = self.index(shard)
        key = idx.keys[i]
        off, size = map(int, idx.prov[i])
        if size < 0:
            raise SampleError(f"{shard.name}/{key} has no .json component to check its .jpg against")
        raw = self._read(shard, off, size, what=f"{shard.name}/{key}.json")
        try:
            provenance = json.loads(raw)
        except ValueError as exc:
            raise SampleError(f"{shard.name}/{key}.json is not JSON ({exc})") from exc
        problem = checksum_problem(jpg, provenance if isinstance(provenance, dict) else {})
        if problem:
            raise SampleError(f"{shard.name}/{key}: {problem}")

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


# --------------------------------------------------------------------------------------------
# Per-epoch plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Samples [first, last) of one shard, in the shard's stored order."""
    shard: Shard
    first: int
    last: int


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    rank: int
    world_size: int
    micro_batch: int
    shards: tuple[Shard, ...]      # this epoch's tar order (identical on every rank)
    excluded: tuple[str, ...]      # quarantined shard names left out of this epoch
    order_seed: int
    start: int                     # this rank's sample range [start, end) in that order
    end: int
    steps: int                     # batches every rank runs this epoch

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def segments(self, start: int | None = None, end: int | None = None) -> list[Segment]:
        """The rank's range (or any [start, end) of the epoch order) as per-shard segments."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        out, base = [], 0
        for s in self.shards:
            lo, hi = max(start, base), min(end, base + s.samples)
            if lo < hi:
                out.append(Segment(s, lo - base, hi - base))
            base += s.samples
        return out

    def without(self, names: Iterable[str]) -> "EpochPlan":
        """The same epoch minus some shards (quarantined mid-epoch): same order for the rest, the
        rank ranges recomputed, and the same step count, so every rank still ends the epoch together."""
        names = set(names)
        shards = tuple(s for s in self.shards if s.name not in names)
        total = sum(s.samples for s in shards)
        if total // self.world_size == 0:
            raise DataLoaderError(f"no usable samples left for rank {self.rank} after quarantining {sorted(names)}")
        return replace(self, shards=shards, excluded=tuple(sorted(set(self.excluded) | names)),
                       start=total * self.rank // self.world_size, end=total * (self.rank + 1) // self.world_size)

    def stream_quotas(self, num_streams: int) -> list[int]:
        """Batches of stream k (batches b with b % num_streams == k), k = 0..num_streams-1."""
        return [len(range(k, self.steps, num_streams)) for k in range(num_streams)]

    def stream_segments(self, num_streams: int) -> list[list[Segment]]:
        """The rank's range cut into contiguous chunks, one per stream, sized by its quota (the
        range's spare samples spread over the chunks), so each stream reads its own tars."""
        quotas = self.stream_quotas(num_streams)
        cum = np.concatenate([[0], np.cumsum(quotas)])
        n = self.end - self.start
        bounds = [self.start + (n * int(c)) // max(int(cum[-1]), 1) for c in cum]
        return [self.segments(bounds[k], bounds[k + 1]) for k in range(num_streams)]


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int, world_size: int) -> tuple[int, tuple[Shard, ...]]:
    order_seed = derive_seed("order", seed, epoch, world_size)
    perm = np.random.default_rng(order_seed).permutation(len(shards))
    return order_seed, tuple(shards[i] for i in perm)


def make_plan(shard_set: ShardSet, excluded: Iterable[str], *, epoch: int, seed: int, rank: int,
              world_size: int, micro_batch: int) -> EpochPlan:
    excluded = tuple(sorted(set(excluded)))
    usable = [s for s in shard_set.shards if s.name not in excluded]
    order_seed, ordered = epoch_order(usable, seed, epoch, world_size)
    total = sum(s.samples for s in ordered)
    per_rank = total // world_size
    steps = per_rank // micro_batch
    if steps == 0:
        raise DataLoaderError(
            f"{shard_set.root}: {total} usable samples ({len(excluded)} shard(s) quarantined) give "
            f"{per_rank} per rank on {world_size} rank(s), fewer than train.micro_batch={micro_batch}")
    return EpochPlan(epoch, rank, world_size, micro_batch, ordered, excluded, order_seed,
                     total * rank // world_size, total * (rank + 1) // world_size, steps)


def buffer_shuffle(items: Sequence, buffer: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a fixed-size buffer, as DALI's readers do (`initial_fill`)."""
    if buffer <= 1:
        yield from items
        return
    it = iter(items)
    pool = [x for _, x in zip(range(buffer), it)]
    for x in it:
        j = int(rng.integers(len(pool)))
        yield pool[j]
        pool[j] = x
    order = rng.permutation(len(pool))
    for j in order:
        yield pool[j]
