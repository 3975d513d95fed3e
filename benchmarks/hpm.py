"""Hard patch mining (mask.strategy=hpm) against random masks, on the real trainer's components.

For each strategy the script builds the pretraining components (echocare_dist.train.step:
DeepSpeed engine, fused losses, the loader over generated ultrasound-like shards) in one process
and runs `train_step`, the function the training loop calls. It prints:
- over training (hpm): the Spearman rank correlation, per image over its masked units, between
  the loss predictor's scores and the true per-unit reconstruction error (the fused kernel's
  per-mask-patch sums), averaged over the micro-batch; and the mined share of the ramp;
- cost: images/s and step time of both strategies, the time spent in the mask-mining pass, and
  analytic train FLOPs per image (hpm adds one no-grad encoder forward);
- a PNG (--out) with, per image: the input, the random mask, the mined mask, the predictor's
  scores and the true per-unit error, so one can see where hpm masks.

    python benchmarks/hpm.py                           # tiny_cpu, 80 steps each, CPU
    python benchmarks/hpm.py --steps 200 --set train.micro_batch=16 --out /tmp/hpm
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "echocare" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from echocare_dist.config import load_config  # noqa: E402
from echocare_dist.ontology import load_ontology  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (average ranks are not needed: ties have measure 0)."""
    if a.numel() < 3:
        return float("nan")
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def batch_spearman(scores: torch.Tensor, unit_loss: torch.Tensor, units: torch.Tensor) -> float:
    values = [spearman(scores[i][units[i].bool()].float().cpu(), unit_loss[i][units[i].bool()].float().cpu())
              for i in range(scores.shape[0])]
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def run_strategy(args, strategy: str, shards: Path, work: Path, ontology) -> dict:
    from echocare_dist.models.hpm import units_from_tokens
    from echocare_dist.train import distributed
    from echocare_dist.train.step import build_components, train_step

    sets = [f"data.shards={shards}", f"train.run_dir={work / strategy}", "train.resume=none",
            "tracking.enabled=false", f"train.steps={args.steps}", f"mask.strategy={strategy}",
            f"mask.hpm_warmup_steps={args.ramp}", *args.overrides]
    cfg = load_config(args.preset, sets)
    env = distributed.init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
    c = build_components(cfg, env, run_dir=work / strategy, ontology=ontology)
    mining_s, originals = [0.0], {}
    if c.miner is not None:
        inner = c.miner.remask

        def timed_remask(engine, batch, step, micro):
            t0 = time.perf_counter()
            out = inner(engine, batch, step, micro)
            mining_s[0] += time.perf_counter() - t0
            originals["mask"] = batch["mask"]
            return out
        c.miner.remask = timed_remask
    scale = cfg.mask.mask_patch_size // cfg.model.patch_size
    curve, t_start = [], None
    for step in range(1, args.steps + 1):
        if step == args.warmup + 1:
            t_start, mining_s[0] = time.perf_counter(), 0.0
        res = train_step(c)
        if c.miner is not None and (step % args.every == 0 or step == args.steps):
            units = units_from_tokens(res.batch["mask"], scale)
            curve.append(dict(step=step, share=c.miner.last_share, loss=float(res.loss),
                              rank_loss=float(c.loss_fn.last_rank),
                              spearman=batch_spearman(res.out["difficulty"], c.loss_fn.last_unit_loss, units)))
    elapsed = time.perf_counter() - t_start
    timed = args.steps - args.warmup
    row = dict(strategy=strategy, images_per_s=timed * c.global_batch / elapsed, step_s=elapsed / timed,
               mining_share=mining_s[0] / elapsed, train_gflop=c.flops["train"] / 1e9, curve=curve,
               final_loss=float(res.loss), final_mim=float(res.mim))
    if c.miner is not None and args.out:
        row["grid"] = save_grid(Path(args.out) / "hpm_masks.png", res, originals.get("mask"), c, scale)
    return row


def save_grid(path: Path, res, random_mask, c, scale: int) -> str:
    """Rows of images: input | random mask | mined mask | predicted scores | true per-unit error."""
    from PIL import Image

    from echocare_dist.atomic import atomic_write_bytes
    from echocare_dist.models.hpm import units_from_tokens

    def unit_map(values, side):
        v = values.float().cpu()
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        return torch.nn.functional.interpolate(v[None, None], size=(side, side), mode="nearest")[0, 0]

    target = res.batch["target"].float().cpu()
    n, side = min(4, target.shape[0]), target.shape[-1]
    mined = units_from_tokens(res.batch["mask"], scale)
    rand = units_from_tokens(random_mask, scale) if random_mask is not None else mined
    rows = []
    for i in range(n):
        img = target[i, 0]
        tiles = [img, img * (1 - 0.7 * unit_map(rand[i], side)), img * (1 - 0.7 * unit_map(mined[i], side)),
                 unit_map(res.out["difficulty"][i].detach(), side),
                 unit_map(c.loss_fn.last_unit_loss[i] * mined[i], side)]
        rows.append(torch.cat(tiles, dim=1))
    grid = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    import io
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny_cpu")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--ramp", type=int, default=20, help="mask.hpm_warmup_steps")
    ap.add_argument("--every", type=int, default=10, help="print the correlation every N steps")
    ap.add_argument("--samples", type=int, default=256, help="generated images in the shards")
    ap.add_argument("--out", help="folder for the mask grid PNG")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("echocare_dist", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from echocare_dist.data.testing import write_shards

    cfg = load_config(args.preset, args.overrides)
    ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        side = cfg.model.img_size
        per = max(1, args.samples // 4)
        write_shards(work / "shards", ontology, counts=(per,) * 4, size=(side * 5 // 4, side), pattern="ultrasound")
        rows = [run_strategy(args, s, work / "shards", work, ontology) for s in ("random", "hpm")]
    print(f"# hard patch mining vs random masks: {args.preset}, {args.steps} steps, ramp {args.ramp}, "
          f"{datetime.date.today()}, {describe()}")
    hpm = rows[1]
    print("\nstep | mined share | loss | ranking loss | Spearman(scores, true unit error)")
    for r in hpm["curve"]:
        print(f"{r['step']:4d} | {r['share']:.2f} | {r['loss']:.4f} | {r['rank_loss']:.4f} | {r['spearman']:+.3f}")
    print("\nstrategy | img/s | s/step | mining pass | train GFLOP/img | final loss (mim)")
    for r in rows:
        print(f"{r['strategy']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | {100 * r['mining_share']:.1f} % | "
              f"{r['train_gflop']:.3f} | {r['final_loss']:.4f} ({r['final_mim']:.4f})")
    cost = rows[0]["images_per_s"] / hpm["images_per_s"] - 1
    print(f"\nhpm costs {100 * cost:+.1f} % time per image and "
          f"{100 * (hpm['train_gflop'] / rows[0]['train_gflop'] - 1):+.1f} % FLOPs")
    if hpm.get("grid"):
        print(f"mask grid: {hpm['grid']} (input | random | mined | predicted | true error)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
