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

The numbering of step 2 (the epoch's list, listing.py) is what a loader state records as consumed.
With data.source_weights / data.source_alpha the list is drawn per source (mixture.py) instead of
holding every sample once. A resume on another world size (resume.py) splits only the list's
unconsumed positions (`pool`) over the new ranks, by the same contiguous rule.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..shardfmt import MANIFEST, Manifest, SampleError, ShardError, ShardReader, checksum_problem, read_index
from .listing import EpochList

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

    def provenance(self, shard: Shard, i: int) -> dict:
        """Sample i's .json (its provenance), or SampleError."""
        idx = self.index(shard)
        key = idx.keys[i]
        off, size = map(int, idx.prov[i])
        if size < 0:
            raise SampleError(f"{shard.name}/{key} has no .json component")
        raw = self._read(shard, off, size, what=f"{shard.name}/{key}.json")
        try:
            provenance = json.loads(raw)
        except ValueError as exc:
            raise SampleError(f"{shard.name}/{key}.json is not JSON ({exc})") from exc
        return provenance if isinstance(provenance, dict) else {}

    def check_checksum(self, shard: Shard, i: int, jpg: bytes) -> None:
        """SampleError unless `jpg` (sample i's .jpg as read) matches the checksum in its .json
        (data.verify_samples; shardfmt.CHECKSUM_KEY): one more small read per sample."""
        problem = checksum_problem(jpg, self.provenance(shard, i))
        if problem:
            raise SampleError(f"{shard.name}/{self.index(shard).keys[i]}: {problem}")

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
    start: int                     # this rank's range [start, end) of the split samples (`pool`)
    end: int
    steps: int                     # batches every rank runs this epoch
    listing: EpochList | None = None   # the epoch's positions (listing.py); None: natural over `shards`
    # Positions of `listing` split over the ranks, in list order; None: all of them. Set when a
    # resume on another world size splits only the samples the epoch has not consumed yet.
    pool: np.ndarray | None = field(default=None, compare=False)
    order_world: int = 0           # world size the tar order was drawn for (0: `world_size`)
    consumed_before: tuple = ()    # position ranges consumed before this split (resume.py)
    left_out: tuple[str, ...] = () # shards of `excluded` dropped after the list was drawn (damaged since)
    # Whether the split samples are every sample of `shards`, tar after tar: then DALI reads the tars'
    # own index files with its shard_id / num_shards split (the same split as ours).
    whole_shards: bool = True

    def __post_init__(self):
        if self.listing is None:
            object.__setattr__(self, "listing", EpochList.natural(self.shards))
        if not self.order_world:
            object.__setattr__(self, "order_world", self.world_size)

    @property
    def total(self) -> int:
        """Samples split over the ranks this epoch."""
        return len(self.listing) if self.pool is None else int(len(self.pool))

    def positions(self, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Epoch positions of split samples [start, end) (default: this rank's range)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if self.pool is None:
            return np.arange(start, end, dtype=np.int64)
        return self.pool[start:end]

    def refs(self, positions: np.ndarray) -> list[tuple[Shard, int]]:
        ordinal, index = self.listing.refs(positions)
        shards = self.listing.shards
        return [(shards[int(o)], int(i)) for o, i in zip(ordinal, index)]

    def segments(self, start: int | None = None, end: int | None = None) -> list[Segment]:
        """The rank's range (or any [start, end) of the split samples) as runs of consecutive samples
        of one shard."""
        ordinal, index = self.listing.refs(self.positions(start, end))
        if not len(ordinal):
            return []
        breaks = np.flatnonzero((np.diff(ordinal) != 0) | (np.diff(index) != 1)) + 1
        firsts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(ordinal)]])
        return [Segment(self.listing.shards[int(ordinal[a])], int(index[a]), int(index[b - 1]) + 1)
                for a, b in zip(firsts, ends)]

    def without(self, names: Iterable[str]) -> "EpochPlan":
        """The same epoch minus some shards (quarantined mid-epoch): same order for the rest, the
        rank ranges recomputed, and the same step count, so every rank still ends the epoch together.
        Positions keep their meaning (the left-out shards' positions are dropped from the split)."""
        names = set(names)
        keep = ~self.listing.positions_of_shards(names)
        all_positions = self.positions(0, self.total)
        pool = all_positions[keep[all_positions]]
        total = len(pool)
        if total // self.world_size == 0:
            raise DataLoaderError(f"no usable samples left for rank {self.rank} after quarantining {sorted(names)}")
        return replace(self, pool=pool, shards=tuple(s for s in self.shards if s.name not in names),
                       excluded=tuple(sorted(set(self.excluded) | names)),
                       left_out=tuple(sorted(set(self.left_out) | names)),
                       start=total * self.rank // self.world_size, end=total * (self.rank + 1) // self.world_size)

    def stream_quotas(self, num_streams: int) -> list[int]:
        """Batches of stream k (batches b with b % num_streams == k), k = 0..num_streams-1."""
        return [len(range(k, self.steps, num_streams)) for k in range(num_streams)]

    def stream_bounds(self, num_streams: int) -> list[int]:
        """The rank's range cut into contiguous chunks, one per stream, sized by its quota (the
        range's spare samples spread over the chunks), so each stream reads its own tars."""
        quotas = self.stream_quotas(num_streams)
        cum = np.concatenate([[0], np.cumsum(quotas)])
        n = self.end - self.start
        return [self.start + (n * int(c)) // max(int(cum[-1]), 1) for c in cum]

    def stream_positions(self, num_streams: int) -> list[np.ndarray]:
        b = self.stream_bounds(num_streams)
        return [self.positions(b[k], b[k + 1]) for k in range(num_streams)]

    def stream_segments(self, num_streams: int) -> list[list[Segment]]:
        b = self.stream_bounds(num_streams)
        return [self.segments(b[k], b[k + 1]) for k in range(num_streams)]


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int, world_size: int) -> tuple[int, tuple[Shard, ...]]:
    order_seed = derive_seed("order", seed, epoch, world_size)
    perm = np.random.default_rng(order_seed).permutation(len(shards))
    return order_seed, tuple(shards[i] for i in perm)


def make_plan(shard_set: ShardSet, excluded: Iterable[str], *, epoch: int, seed: int, rank: int,
              world_size: int, micro_batch: int, mixture=None, order_world: int | None = None,
              consumed: np.ndarray | None = None, consumed_ranges: tuple = (),
              left_out: Iterable[str] = ()) -> EpochPlan:
    """Epoch `epoch` for `rank` of `world_size`.

    `mixture` (mixture.Mixture) draws the epoch's list per source; without it every sample is in
    the list once. For a resume on another world size (resume.py): `order_world` is the world size
    the epoch's tar order was drawn for, `consumed` (bool per position) the samples it consumed
    before, `left_out` shards damaged since: only the other positions are split over the ranks."""
    excluded = tuple(sorted(set(excluded)))
    usable = [s for s in shard_set.shards if s.name not in excluded]
    order_world = order_world or world_size
    order_seed, ordered = epoch_order(usable, seed, epoch, order_world)
    listing = mixture.listing(ordered, seed=seed, epoch=epoch) if mixture is not None else EpochList.natural(ordered)
    pool = None
    left_out = set(left_out)
    if consumed is not None or left_out:
        keep = ~listing.positions_of_shards(left_out)
        if consumed is not None:
            if len(consumed) != len(keep):
                raise DataLoaderError(f"the saved epoch {epoch} had {len(consumed)} positions, its list now has "
                                      f"{len(keep)}")
            keep &= ~consumed
        pool = np.flatnonzero(keep).astype(np.int64)
    total = len(listing) if pool is None else len(pool)
    per_rank = total // world_size
    steps = per_rank // micro_batch
    if steps == 0 and pool is None:
        raise DataLoaderError(
            f"{shard_set.root}: {total} usable samples ({len(excluded)} shard(s) quarantined) give "
            f"{per_rank} per rank on {world_size} rank(s), fewer than train.micro_batch={micro_batch}")
    if left_out:
        ordered = tuple(s for s in ordered if s.name not in left_out)
    return EpochPlan(epoch, rank, world_size, micro_batch, ordered, tuple(sorted(set(excluded) | left_out)),
                     order_seed, total * rank // world_size, total * (rank + 1) // world_size, steps,
                     listing=listing, pool=pool, order_world=order_world,
                     consumed_before=tuple(map(tuple, consumed_ranges)), left_out=tuple(sorted(left_out)),
                     whole_shards=pool is None and listing.is_natural)


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
