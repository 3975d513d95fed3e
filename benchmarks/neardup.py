"""Cost of near-duplicate removal (curation.near_dedup, on by default) at scale.

    .venv/bin/python benchmarks/neardup.py                 # 1 M synthetic 64-bit hashes
    .venv/bin/python benchmarks/neardup.py --hashes 5000000 --dup-share 0.05

Feeds NearDuplicateIndex (curation/neardup.py, the planner's filter) with uniformly random
64-bit hashes plus a share of planted near-duplicates (1-3 bits flipped from an earlier hash),
in the planner's order, and reports wall time, rate, peak process memory and how many planted
near-duplicates were found (all of them must be). CPU seconds are given beside wall seconds:
on a shared machine the wall time mostly measures the other jobs. Real pHashes cluster more than uniform ones,
so buckets hold more candidates there; the figure is a lower bound on cost for unclustered data.
"""
from __future__ import annotations

import argparse
import datetime
import time
import resource

import numpy as np
from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

from echocare_dist.curation.neardup import NearDuplicateIndex, max_distance


def hashes(n: int, dup_share: float, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n hashes; the last dup_share of them each copy an earlier one with 1..d bits flipped.
    Returns (hashes in feed order, bool mask of the planted near-duplicates)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) ^ (
        rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63))
    n_dup = int(n * dup_share)
    planted = np.zeros(n, bool)
    if n_dup:
        pos = rng.choice(np.arange(n // 2, n), size=n_dup, replace=False)
        src = rng.integers(0, n // 2, n_dup)
        for p, s in zip(pos, src):
            bits = rng.choice(64, size=int(rng.integers(1, d + 1)), replace=False)
            flip = np.uint64(sum(1 << int(b) for b in bits))
            out[p] = out[s] ^ flip
        planted[pos] = True
    return out, planted


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hashes", type=int, default=1_000_000)
    ap.add_argument("--similarity", type=float, default=0.95, help="curation.near_dedup_similarity")
    ap.add_argument("--dup-share", type=float, default=0.02, help="planted near-duplicates (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = max_distance(args.similarity)
    data, planted = hashes(args.hashes, args.dup_share, d, args.seed)
    index = NearDuplicateIndex(args.similarity)
    t0, c0 = time.perf_counter(), time.process_time()
    found = np.zeros(len(data), bool)
    for i, h in enumerate(data.tolist()):
        found[i] = index.add(h, i) is not None
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss()
    print(f"# near-duplicate filter, {datetime.date.today()} on {describe()}")
    print(f"| hashes | similarity (max bits) | wall s | CPU s | hashes/CPU s | peak RSS MiB | planted found | other hits |")
    print(f"|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(data):,} | {args.similarity} ({d}) | {wall:.1f} | {cpu:.1f} | {len(data) / cpu:,.0f} | "
          f"{peak / 2**20:.0f} | {int((found & planted).sum())}/{int(planted.sum())} | "
          f"{int((found & ~planted).sum())} |")


if __name__ == "__main__":
    main()
