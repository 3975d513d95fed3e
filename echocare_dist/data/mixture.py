"""Per-source mixture (data.source_weights / data.source_alpha): how many samples of each source an
epoch holds, and which.

An epoch keeps its length N (all usable samples). Source s, with n_s samples, gets a target share
w_s: data.source_weights[s] / sum of the weights, or n_s^alpha / sum_t n_t^alpha with
data.source_alpha (alpha = 1: the natural shares, 0: every source alike). Its count c_s =
w_s * N, rounded by largest remainder so the counts sum to N. A source with c_s <= n_s gives
c_s of its samples drawn without replacement; one with c_s > n_s (its weight exceeds its share)
gives every sample floor(c_s / n_s) times plus a draw of the rest: sampling with replacement,
stratified so the realised count is exact. The draw is seeded by (data.seed, epoch, source),
independent of the world size and the loader, so both loaders, a resume and a resume on another
world size read the same epoch. The repeats of a sample are copy 1, 2, ...: the augmentation and
the SimMIM mask are drawn per copy, so a repeat is not a duplicate image.

The epoch's list keeps the tar order (tars are read in the epoch's order, each tar's drawn samples
in a seeded shuffle), so a rank still reads few tars at a time.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_json

from .listing import EpochList
from .shards import DataLoaderError, SampleError, ShardError, ShardSet, TarReader, derive_seed


log = logging.getLogger(__name__)

SOURCES_FILE = "sources.json"   # {run_dir}/sources.json: each shard's per-sample source ids (a cache)


class MixtureError(ValueError):
    """The configured mixture does not fit the shards (names the data.* key)."""


def mixture_enabled(data_cfg) -> bool:
    return data_cfg.source_weights is not None or data_cfg.source_alpha is not None


def target_shares(sizes: dict[str, int], data_cfg) -> dict[str, float]:
    """Source -> configured share of the epoch (sums to 1)."""
    if data_cfg.source_weights is not None:
        weights = {str(k): float(v) for k, v in data_cfg.source_weights.items()}
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise MixtureError(f"data.source_weights names source(s) {unknown} that no usable shard holds; "
                               f"the sources are {sorted(sizes)}")
        missing = sorted(set(sizes) - set(weights))
        if missing:
            raise MixtureError(f"data.source_weights has no weight for source(s) {missing}: give every source "
                               f"a weight (0 leaves it out); the sources are {sorted(sizes)}")
    else:
        alpha = float(data_cfg.source_alpha)
        weights = {s: float(n) ** alpha if n > 0 else 0.0 for s, n in sizes.items()}
    total = sum(w for s, w in weights.items() if sizes[s] > 0)
    if total <= 0:
        raise MixtureError(f"data.source_weights gives no weight to any source with samples ({sizes})")
    return {s: (weights[s] / total if sizes[s] > 0 else 0.0) for s in sorted(sizes)}


def epoch_counts(sizes: dict[str, int], shares: dict[str, float]) -> dict[str, int]:
    """Per-source samples of an epoch of sum(sizes) samples: largest-remainder rounding of the shares."""
    n = sum(sizes.values())
    raw = {s: shares[s] * n for s in sorted(sizes)}
    counts = {s: int(math.floor(v)) for s, v in raw.items()}
    short = n - sum(counts.values())
    for s in sorted(raw, key=lambda s: (counts[s] - raw[s], s))[:short]:
        counts[s] += 1
    return counts


def effective_mixture(sizes: dict[str, int], data_cfg) -> dict[str, dict]:
    """What a run records (run dir + MLflow): per source its samples, natural and configured share,
    samples per epoch and how often each sample is read on average."""
    shares = target_shares(sizes, data_cfg)
    counts = epoch_counts(sizes, shares)
    n = sum(sizes.values())
    return {s: {"samples": int(sizes[s]), "natural_share": sizes[s] / n, "share": shares[s],
                "per_epoch": counts[s], "reads_per_sample": counts[s] / sizes[s] if sizes[s] else 0.0}
            for s in sorted(sizes)}


def draw(members: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(member indices, copy numbers) of `count` draws from `members` (stratified, see module doc)."""
    if members == 0 or count == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    full, rest = divmod(count, members)
    picks = [np.arange(members, dtype=np.int64)] * full
    copies = [np.full(members, c, np.int32) for c in range(full)]
    if rest:
        picks.append(np.sort(rng.choice(members, size=rest, replace=False)).astype(np.int64))
        copies.append(np.full(rest, full, np.int32))
    return np.concatenate(picks), np.concatenate(copies)


def mixture_list(shards, sources: dict[str, np.ndarray], names: list[str], counts: dict[str, int], *,
                 seed: int, epoch: int) -> EpochList:
    """The epoch's explicit list over `shards` (epoch order). `sources[shard.name]` holds the source
    id (into `names`) of each sample of that shard; `counts` the samples per source."""
    canonical = sorted(shards, key=lambda s: s.name)   # the draw must not depend on the tar order
    ordinal = {s.name: k for k, s in enumerate(shards)}
    sid = np.concatenate([sources[s.name] for s in canonical]) if canonical else np.zeros(0, np.int32)
    shard_ord = np.concatenate([np.full(s.samples, ordinal[s.name], np.int32) for s in canonical])
    index = np.concatenate([np.arange(s.samples, dtype=np.int64) for s in canonical])
    chosen, copies = [], []
    for source_id, source in enumerate(names):
        members = np.flatnonzero(sid == source_id)
        rng = np.random.default_rng(derive_seed("mixture", seed, epoch, source, bits=63))
        picks, copy = draw(len(members), counts.get(source, 0), rng)
        chosen.append(members[picks])
        copies.append(copy)
    chosen = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    copies = np.concatenate(copies) if copies else np.zeros(0, np.int32)
    out_shard, out_index, out_copy = [], [], []
    by_shard = shard_ord[chosen]
    for k, s in enumerate(shards):
        sel = np.flatnonzero(by_shard == k)
        rng = np.random.default_rng(derive_seed("mixture-order", seed, epoch, s.name, bits=63))
        sel = sel[rng.permutation(len(sel))]
        out_shard.append(np.full(len(sel), k, np.int32))
        out_index.append(index[chosen[sel]])
        out_copy.append(copies[sel])
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    return EpochList(tuple(shards), cat(out_shard, np.int32), cat(out_index, np.int64), cat(out_copy, np.int32))


class Mixture:
    """The configured mixture over one shard set: reads each sample's source once (one small read
    of its .json per sample, at the loader's start) and draws the epochs' lists."""

    def __init__(self, shard_set: ShardSet, data_cfg, cache: Path | None = None):
        self.shard_set, self.data_cfg = shard_set, data_cfg
        self.names: list[str] = []
        self._sources: dict[str, np.ndarray] = {}
        if not (cache is not None and self._load_cache(cache)):
            self._read_sources()
            if cache is not None:
                self._write_cache(cache)

    def _fingerprint(self) -> dict:
        return {s.name: [s.samples, s.bytes] for s in self.shard_set.shards}

    def _load_cache(self, path: Path) -> bool:
        """The source table of an earlier start of this run ({run_dir}/SOURCES_FILE), when it describes
        these very shards (names, sample counts, sizes); a damaged or stale one is read again."""
        try:
            data = json.loads(path.read_text())
            if data.get("shards") != self._fingerprint():
                return False
            names = [str(n) for n in data["names"]]
            sources = {k: np.asarray(v, np.int32) for k, v in data["sources"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if set(sources) != set(self.shard_set.by_name) or any(
                len(sources[s.name]) != s.samples or (len(sources[s.name]) and int(sources[s.name].max()) >= len(names))
                for s in self.shard_set.shards):
            return False
        self.names, self._sources = names, sources
        return True

    def _write_cache(self, path: Path) -> None:
        try:
            atomic_write_json(path, {"shards": self._fingerprint(), "names": self.names,
                                     "sources": {k: v.tolist() for k, v in self._sources.items()}}, indent=None)
        except OSError as exc:  # a cache only: the next start reads the sources again
            log.warning("cannot write the source table %s (%s)", path, exc)

    def _read_sources(self) -> None:
        ids: dict[str, int] = {}
        reader = TarReader(self.shard_set.num_classes)
        try:
            for shard in self.shard_set.shards:
                out = np.zeros(shard.samples, np.int32)
                for i in range(shard.samples):
                    try:
                        source = reader.provenance(shard, i).get("source")
                    except (SampleError, ShardError, OSError) as exc:
                        raise DataLoaderError(f"data.source_weights / data.source_alpha need each sample's "
                                              f"source: {exc}") from exc
                    if not isinstance(source, str) or not source:
                        raise DataLoaderError(f"{shard.name} sample {i}: its .json has no 'source' (needed by "
                                              f"data.source_weights / data.source_alpha)")
                    out[i] = ids.setdefault(source, len(ids))
                self._sources[shard.name] = out
        finally:
            reader.close()
        self.names = list(ids)

    def sizes(self, shards) -> dict[str, int]:
        counts = np.zeros(len(self.names), np.int64)
        for s in shards:
            counts += np.bincount(self._sources[s.name], minlength=len(self.names))
        return {name: int(counts[k]) for k, name in enumerate(self.names)}

    def effective(self, shards) -> dict[str, dict]:
        try:
            return effective_mixture(self.sizes(shards), self.data_cfg)
        except MixtureError as exc:
            raise DataLoaderError(str(exc)) from None

    def listing(self, shards, *, seed: int, epoch: int) -> EpochList:
        sizes = self.sizes(shards)
        try:
            counts = epoch_counts(sizes, target_shares(sizes, self.data_cfg))
        except MixtureError as exc:
            raise DataLoaderError(str(exc)) from None
        return mixture_list(shards, self._sources, self.names, counts, seed=seed, epoch=epoch)

    def source_of(self, shard, index: int) -> str:
        return self.names[int(self._sources[shard.name][index])]


MIXTURE_FILE = "mixture.json"   # {run_dir}/mixture.json: effective_mixture() of the run's first epoch


def mixture_params(mixture: dict[str, dict]) -> dict[str, str]:
    """MLflow params of an effective mixture: data.mixture.<source>.{share,per_epoch} (source names
    reduced to the characters MLflow accepts in a key)."""
    def key(name: str) -> str:
        return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name) or "_"
    return {f"data.mixture.{key(source)}.{field}": f"{row[field]:.6g}"
            for source, row in mixture.items() for field in ("share", "natural_share", "per_epoch")}
