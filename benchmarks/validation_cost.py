"""What validation during pretraining costs (docs/validation.md), measured on a run and extrapolated.

    python benchmarks/validation_cost.py RUN_DIR [--global-batch 256 --val-samples 1024 --val-every 1000]

RUN_DIR is any pretraining run that validated (metrics.jsonl with val/ figures), e.g. the tiny one:

    echocare synth --config tiny_cpu --out /tmp/vc/synth
    echocare shards build --config tiny_cpu --set curation.val_fraction=0.2 \
        --mapping /tmp/vc/synth/labels.yaml --out /tmp/vc/shards
    echocare pretrain --nproc 2 --config tiny_cpu --set data.shards=/tmp/vc/shards \
        --set train.run_dir=/tmp/vc/run --set train.steps=40 --set train.val_every=10 --set tracking.enabled=false

Measured: r = (validation seconds per validated sample) / (training seconds per trained sample), per
rank. A validation handles val_samples / W samples per rank, a step global_batch / W, so the share
of time spent validating at an interval N is

    cost = r * val_samples / (global_batch * N)

r is ~2/3 when forwards dominate (2 forwards per validated sample, ~3 forward-equivalents per
trained one); on a tiny CPU model the fixed costs (per-sample loss calls, the gather, the k-NN)
push it up, so the tiny figure is an upper bound for the paper's scale, where the model is large.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def measure(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["train"]
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    per_rank_batch = train["micro_batch"] * train["grad_accum"]
    world = ds["train_batch_size"] // per_rank_batch
    validations = [r for r in records if "val/time_s" in r]
    if not validations:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation record (train.val_every, a val shard set)")
    steps = [r["step_time_s"] for r in records if r["step"] > 1]  # step 1 carries the start-up
    val_s = statistics.median(r["val/time_s"] for r in validations)
    step_s = statistics.median(steps)
    val_per_rank = validations[0]["val/samples"] / world
    r = (val_s / val_per_rank) / (step_s / per_rank_batch)
    return dict(world=world, per_rank_batch=per_rank_batch, val_every=train["val_every"],
                val_samples=validations[0]["val/samples"], val_s=val_s, step_s=step_s, r=r,
                measured_cost=val_s / (train["val_every"] * step_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--global-batch", type=int, default=256, help="the paper's: 32 per GPU x 8 GPUs")
    ap.add_argument("--val-samples", type=int, default=1024)
    ap.add_argument("--val-every", type=int, default=1000)
    ap.add_argument("--budget", type=float, default=0.03)
    args = ap.parse_args()
    m = measure(args.run_dir)
    print(f"run {args.run_dir}: {m['world']} ranks x {m['per_rank_batch']} per step, validation of "
          f"{m['val_samples']:.0f} samples every {m['val_every']} steps")
    print(f"  median step {m['step_s']:.3f} s, median validation {m['val_s']:.3f} s -> "
          f"{100 * m['measured_cost']:.2f} % of training time at this interval")
    print(f"  r = {m['r']:.2f} (validation s per sample / training s per sample; ~0.67 when forwards dominate)")
    cost = m["r"] * args.val_samples / (args.global_batch * args.val_every)
    floor = m["r"] * args.val_samples / (args.global_batch * args.budget)
    print(f"extrapolated: global batch {args.global_batch}, {args.val_samples} validation samples every "
          f"{args.val_every} steps -> {100 * cost:.3f} % (with this r; with r = 0.67: "
          f"{100 * 0.67 * args.val_samples / (args.global_batch * args.val_every):.3f} %); under "
          f"{100 * args.budget:.0f} % from val_every >= {floor:.0f}")


if __name__ == "__main__":
    main()
