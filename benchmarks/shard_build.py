"""Shard build throughput vs number of curation workers.

    .venv/bin/python benchmarks/shard_build.py                       # synthetic set, workers 1 and 2
    .venv/bin/python benchmarks/shard_build.py --images 1000 --workers 1 2 4
    .venv/bin/python benchmarks/shard_build.py --mapping my_data.yaml  # your own collection

Each run builds from scratch into a fresh folder (decode, crop, hash, JPEG, plan, write tars +
indexes) and reports wall time including the worker pool start-up (~1-2 s with spawn), so small
sets understate the steady-state rate.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

from echocare_dist.config import load_config
from echocare_dist.curation import build_shards
from echocare_dist.ontology import load_ontology


def hardware() -> str:
    return describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny_cpu")
    ap.add_argument("--mapping", action="append", default=[], help="benchmark on these mappings instead")
    ap.add_argument("--images", type=int, default=400, help="synthetic still images (default: %(default)s)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="runs per worker count; the best is reported")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"synth.num_images={args.images}"])
    ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="shard_bench_"))
    try:
        mappings = [Path(m) for m in args.mapping]
        if not mappings:
            from echocare_dist.synth import generate_dataset
            t = time.perf_counter()
            synth = generate_dataset(work / "data", cfg.synth, ontology)
            print(f"synthetic set: {synth.counts()} ({time.perf_counter() - t:.1f} s to generate)")
            mappings = [synth.mapping]
        rows = []
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        for workers in args.workers:
            best = None
            for r in range(args.repeat):
                out = work / f"shards-w{workers}-{r}"
                run_cfg = load_config(args.config, [f"curation.workers={workers}"])
                t = time.perf_counter()
                m = build_shards(mappings, out, run_cfg, ontology, progress=False)
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
                shutil.rmtree(out)
            frames = m.staged_samples + m.rejected["too_few_pixels"]["count"]
            rows.append((workers, m.files, frames, m.num_samples, best, frames / best, m.num_samples / best))
        print(f"\nshard build, config {args.config}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        print(f"hardware: {hardware()}; load average before/after: {load_before} / "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share these cores)")
        head = f"{'workers':>7} {'files':>6} {'frames':>7} {'samples':>8} {'seconds':>8} {'frames/s':>9} {'samples/s':>10} {'speed-up':>8}"
        print(head)
        print("-" * len(head))
        for w, files, frames, samples, dt, fps, sps in rows:
            print(f"{w:>7} {files:>6} {frames:>7} {samples:>8} {dt:>8.2f} {fps:>9.1f} {sps:>10.1f} "
                  f"{rows[0][4] / dt:>7.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
