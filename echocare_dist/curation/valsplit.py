"""The validation hold-out of a shard build (`curation.val_fraction`): which kept samples go to
`<out>/val/` instead of the training shards, and the group file that travels with them.

Samples that show the same scan never land on both sides, or validation measures memory:
- frames of one file (a video, a DICOM cine) form one group;
- near-duplicates (64-bit pHash within `curation.near_dedup_similarity`, the builder's own
  greedy rule) are merged into one group. Exact duplicates never get this far: the plan keeps
  one sample per pixel hash. With `curation.near_dedup=true` near-duplicates are dropped too, so
  this only merges something when near-dedupe is off.
Groups are merged with union-find. The hold-out is stratified by source: each source gives its
groups, in an order fixed by a seeded hash of the group's first key, while its held-out samples
stay within round(val_fraction * samples) (at least one group; never all of a source's groups), so
every source appears in the per-source validation figures and still trains. A group that would
overshoot the target is passed over (a long video does not take half a source); a source of only
such groups gives its smallest one.

`<out>/val/groups.json` ({"format": 1, "groups": {key: group id}}) is this module's format: the
validation probe (train/validation.py) never takes a k-NN neighbour from the query's own group.
The val manifest carries the build's fingerprint, so a reader can tell that a val set belongs
to the training shards beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_write_json
from ..shardfmt import MANIFEST, Manifest, ShardError, read_index
from .neardup import NearDuplicateIndex
from .outdir import damaged_shards, keep_intact_shards, shard_entries

log = logging.getLogger(__name__)

VAL_DIR = "val"
GROUPS_FILE = "groups.json"
GROUPS_FORMAT = 1


def val_dir(out_dir: Path) -> Path:
    return Path(out_dir) / VAL_DIR


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller position is the root: group ids do not depend on merge order
            self.parent[max(ra, rb)] = min(ra, rb)


def sample_groups(file_ids: np.ndarray, phashes: Sequence[int], similarity: float) -> np.ndarray:
    """Group id (the group's first position) for each of the kept samples, given in file order:
    same file, or pHash within `similarity` of a sample already seen."""
    n = len(file_ids)
    uf = _UnionFind(n)
    first_of_file: dict[int, int] = {}
    for pos in range(n):
        first = first_of_file.setdefault(int(file_ids[pos]), pos)
        if first != pos:
            uf.union(first, pos)
    index = NearDuplicateIndex(similarity)
    for pos in range(n):
        match = index.add(int(phashes[pos]), pos)
        if match is not None:
            uf.union(match, pos)
    return np.fromiter((uf.find(p) for p in range(n)), dtype=np.int64, count=n)


def _group_order_key(seed: int, key: int) -> bytes:
    return hashlib.blake2b(f"val:{seed}:{key:016x}".encode(), digest_size=8).digest()


def choose_held_out(groups: np.ndarray, sources: Sequence[str], keys: np.ndarray, fraction: float,
                    seed: int) -> np.ndarray:
    """Bool per kept sample: held out for validation. `groups` from `sample_groups`, `sources` the
    source name of each sample, `keys` its uint64 key (the group's first key orders the groups)."""
    held = np.zeros(len(groups), dtype=bool)
    if fraction <= 0 or not len(groups):
        return held
    members: dict[int, list[int]] = {}
    for pos, g in enumerate(groups):
        members.setdefault(int(g), []).append(pos)
    by_source: dict[str, list[int]] = {}
    for g in members:  # a group counts for the source of its first sample
        by_source.setdefault(sources[g], []).append(g)
    for source in sorted(by_source):
        source_groups = sorted(by_source[source], key=lambda g: _group_order_key(seed, int(keys[g])))
        total = sum(len(members[g]) for g in source_groups)
        target = max(1, int(round(fraction * total)))
        taken, chosen = 0, []
        for g in source_groups:  # a group that would overshoot the target is passed over
            if taken + len(members[g]) <= target and len(chosen) < len(source_groups) - 1:
                chosen.append(g)
                taken += len(members[g])
        if not chosen and len(source_groups) > 1:  # only large groups: the smallest one
            chosen = [min(source_groups, key=lambda g: len(members[g]))]
        for g in chosen:
            held[members[g]] = True
    return held


def write_groups(out: Path, shards: Sequence[str], members: Sequence[np.ndarray], group_of: dict[int, int]) -> Path:
    """groups.json of the written val shards: each key as the shard's index names it (whatever
    the builder's key rule) -> the group id of the sample written there."""
    out = Path(out)
    groups: dict[str, int] = {}
    for name, shard_members in zip(shards, members):
        entries = read_index((out / name).with_suffix(".idx"))
        if len(entries) != len(shard_members):
            raise ShardError(f"{out / name}: index lists {len(entries)} samples, the plan wrote {len(shard_members)}")
        for entry, i in zip(entries, shard_members):
            groups[entry.key] = int(group_of[int(i)])
    path = out / GROUPS_FILE
    atomic_write_json(path, {"format": GROUPS_FORMAT, "groups": groups})
    return path


def read_groups(shard_dir: Path) -> dict[str, int] | None:
    """{key: group id} of a val shard set, or None when it has no group file (a set built elsewhere:
    every sample is then its own group)."""
    path = Path(shard_dir) / GROUPS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: cannot read the validation groups ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != GROUPS_FORMAT or not isinstance(data.get("groups"), dict):
        raise ShardError(f"{path}: expected {{'format': {GROUPS_FORMAT}, 'groups': {{key: id}}}}")
    bad = [k for k, v in data["groups"].items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ShardError(f"{path}: group ids must be integers (key {bad[0]!r})")
    return data["groups"]


def held_out_manifest(out_dir: Path) -> Manifest | None:
    """The val manifest beside a build's shards, or None when the build held nothing out."""
    if not (val_dir(out_dir) / MANIFEST).is_file():
        return None
    return Manifest.read(val_dir(out_dir))


# ---------------------------------------------------------------------------------------------
# the builder's hooks
# ---------------------------------------------------------------------------------------------
def clear_held_out(out_dir: Path, fraction: float) -> None:
    """At the start of a (re)build: the val manifest goes with the main one (a val set is only
    readable once its build finished); without a hold-out any old val set is removed, so a
    trainer never validates on samples that now train."""
    target = val_dir(out_dir)
    if fraction <= 0:
        shutil.rmtree(target, ignore_errors=True)
    else:
        (target / MANIFEST).unlink(missing_ok=True)


def held_out_damaged(out_dir: Path, manifest: Manifest, fraction: float, verify: bool, staging: Path) -> bool:
    """Whether the val set beside an up-to-date build needs a rebuild (missing, from another build,
    damaged shards). Then the write records of every intact shard, main and val, are kept, so the
    rebuild rewrites only what is damaged."""
    if fraction <= 0:
        return False
    target = val_dir(out_dir)
    try:
        val = Manifest.read(target)
    except ShardError as exc:
        log.warning("%s: rebuilding the validation set: %s", target, exc)
        keep_intact_shards(staging / "shards", manifest, {})
        return True
    damaged = damaged_shards(target, val, full=verify) if val.fingerprint == manifest.fingerprint else {"*": "another build"}
    if not damaged:
        return False
    log.warning("%s: %d damaged validation shard(s), rebuilding them: %s", target, len(damaged),
                "; ".join(f"{name}: {why}" for name, why in list(damaged.items())[:10]))
    keep_intact_shards(staging / "shards", manifest, {})
    if "*" not in damaged:
        keep_intact_shards(staging / VAL_DIR / "shards", val, damaged)
    return True


def write_held_out(out_dir: Path, shards: Sequence[np.ndarray], write_shards: Callable[[Path], list[dict]],
                   group_of: dict[int, int], per_source: dict, per_node: dict, base: dict) -> Manifest:
    """Write the val shard set (`write_shards(dir)` is the builder's writer over the held-out plan),
    its group file, then its manifest (`base`: the fields it shares with the main manifest)."""
    target = val_dir(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    records = write_shards(target)
    for entry in target.glob("shard-*"):  # shards of an earlier, larger hold-out
        if entry.stem not in {Path(r["name"]).stem for r in records}:
            entry.unlink(missing_ok=True)
    write_groups(target, [r["name"] for r in records], shards, group_of)
    manifest = Manifest(num_samples=int(sum(r["samples"] for r in records)),
                        shards=shard_entries(records),
                        per_source=per_source, per_node=per_node, rejected={}, **base)
    manifest.write(target)
    return manifest
