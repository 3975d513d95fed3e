"""`echocare demo`: the README's main job, end to end on an embedded default.

synthesize -> build + verify shards -> pretrain on N local ranks (DeepSpeed ZeRO, CPU or GPU)
-> export the encoder -> `echocare evaluate` on organ classification (pretrained vs random init vs
a raw-pixel baseline, one table) -> fine-tune a segmenter -> summary, ending with that table.
The figures are a smoke test of the chain on a few hundred synthetic images, not results.

Every stage runs as the very `echocare ...` command a user would type (printed before it
runs), so the demo doubles as a walkthrough. No GPU, server or download is needed: the data is
synthetic (echocare_dist.synth) and every stage (pretraining, export, evaluation, fine-tuning)
tracks into ONE MLflow store, OUT/mlflow.db (artifacts in OUT/mlartifacts): one `mlflow ui
--backend-store-uri sqlite:///OUT/mlflow.db` shows the whole chain, the fine-tuning runs tagged
with the pretraining run they started from.
Re-running continues where it stopped: finished stages are detected and skipped.
"""
from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


class DemoError(RuntimeError):
    pass


def tracking_store(out: Path) -> str:
    """The demo's one MLflow store (tracking.py keeps its artifacts in OUT/mlartifacts)."""
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def _run(step: str, argv: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "echocare_dist.cli", *argv]
    print(f"\n=== {step}\n$ echocare {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.time()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:  # tee: the user sees progress, the log keeps everything
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            fh.write(line)
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f"step '{step}' failed with exit code {rc}; full output in {log}")
    return time.time() - start


def _classification_csv(synth_root: Path, out: Path) -> int:
    """Organ classification (which source dataset) from the synthetic ground truth."""
    manifest = json.loads((synth_root / "synth_manifest.json").read_text())
    rows = [(f["path"], f["source"]) for f in manifest["files"]
            if f.get("kind") == "image" and f.get("role") == "regular" and f.get("source") != "Unsorted scans"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


def run_demo(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    # The shared store comes before the user's --set, so an explicit tracking.uri still wins.
    store = ["--set", f"tracking.uri={tracking_store(out)}"]
    # A validation hold-out at build time and its curves during pretraining (docs/validation.md);
    # before the user's --set, which still wins.
    validation = ["--set", "curation.val_fraction=0.15", "--set", "train.val_every=10"]
    cfg_args = ["--config", args.config, *store, *validation] + [x for item in args.overrides for x in ("--set", item)]
    synth, shards, run_dir = out / "synthetic data", out / "shards", out / "pretrain"
    export, ft_cls, ft_seg = out / "export", out / "finetune-classification", out / "finetune-segmentation"
    times: dict[str, float] = {}

    if not (synth / "labels.yaml").exists():
        times["synthesize"] = _run("synthesize B-mode images, videos, DICOM cine",
                                   ["synth", *cfg_args, "--out", str(synth)], log)
    times["shards"] = _run("build WebDataset shards (crop, dedupe, label, shuffle, index)",
                           ["shards", "build", *cfg_args, "--mapping", str(synth / "labels.yaml"),
                            "--out", str(shards), "--no-progress"], log)
    times["verify"] = _run("verify every shard", ["shards", "verify", str(shards)], log)
    _run("contact sheet", ["shards", "inspect", str(shards), "--out", str(out / "contact_sheet.png")], log)
    if args.stop_after == "shards":
        return _summary(out, times, shards=shards)

    train_sets = [f"data.shards={shards}", f"train.run_dir={run_dir}"]
    times["pretrain"] = _run(f"pretrain on {args.nproc} local rank(s)",
                             ["pretrain", "--nproc", str(args.nproc), *cfg_args,
                              *[x for s in train_sets for x in ("--set", s)]], log)
    times["export"] = _run("export the encoder (safetensors + JSON)",
                           ["export", str(run_dir), "--out", str(export), "--with-heads", "--no-progress"], log)
    if args.stop_after == "export":
        return _summary(out, times, shards=shards, run_dir=run_dir, export=export)

    cls_csv = out / "finetune data" / "organ_classes.csv"
    _classification_csv(synth, cls_csv)
    common = ["--set", f"finetune.checkpoint={export / 'encoder.safetensors'}", "--set", "tracking.enabled=true"]
    times["evaluate classification"] = _run(
        "organ classifier: pretrained vs random init vs raw-pixel logistic regression, one split",
        ["evaluate", *cfg_args, *common, "--set", "finetune.task=classification",
         "--set", f"finetune.data={synth}", "--set", f"finetune.csv={cls_csv}",
         "--set", f"finetune.run_dir={ft_cls}"], log)
    times["finetune segmentation"] = _run(
        "fine-tune a lesion segmenter (masks at another size than their images)",
        ["finetune", *cfg_args, *common, "--set", "finetune.task=segmentation",
         "--set", f"finetune.data={synth / 'Breast US'}", "--set", f"finetune.run_dir={ft_seg}"], log)
    return _summary(out, times, shards=shards, run_dir=run_dir, export=export,
                    finetune=[ft_cls / "pretrained", ft_seg], evaluation=ft_cls / "evaluate.txt")


def _summary(out: Path, times: dict, shards: Path, run_dir: Path | None = None, export: Path | None = None,
             finetune: list[Path] | None = None, evaluation: Path | None = None) -> int:
    from .shardfmt import Manifest
    manifest = Manifest.read(shards)
    rejected = {k: v["count"] for k, v in manifest.rejected.items()}
    lines = ["", "=" * 72, "echocare demo: what was produced", "=" * 72,
             f"shards      {shards}  ({manifest.num_samples} samples in {len(manifest.shards)} tars; "
             f"rejected {rejected})",
             f"contact     {out / 'contact_sheet.png'}"]
    if run_dir is not None:
        ckpt = run_dir / "checkpoints"
        latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else "none"
        metrics = run_dir / "metrics.jsonl"
        losses, val_losses = [], []
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if "loss" in rec:
                    losses.append(rec["loss"])
                if "val/loss" in rec:
                    val_losses.append(rec["val/loss"])
        trend = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if len(losses) >= 2 else "no loss logged"
        if len(val_losses) >= 2:
            trend += f"; validation loss {val_losses[0]:.4f} -> {val_losses[-1]:.4f}"
        lines += [f"pretrain    {run_dir}  (latest checkpoint {latest}; {trend})"]
    if export is not None:
        meta = json.loads((export / "encoder.json").read_text())
        src = meta.get("source", {})
        lines += [f"export      {export / 'encoder.safetensors'}  ({meta.get('arch')}, step {src.get('step')}, "
                  f"ZeRO-{src.get('zero_stage')} x {src.get('world_size')} ranks)"]
    for ft in finetune or []:
        metrics = ft / "metrics.json"
        summary = json.loads(metrics.read_text()) if metrics.exists() else {}
        best = summary.get("best") or {}
        shown = ", ".join(f"{k[4:]} {v:.3f}" for k, v in best.items() if k.startswith("val_") and k != "val_loss")
        lines += [f"finetune    {ft}  ({summary.get('task')}, best epoch {summary.get('best_epoch')}: {shown})"]
    lines += [f"MLflow      mlflow ui --backend-store-uri {tracking_store(out)}  (every stage, one store)",
              "timings     " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()), "=" * 72]
    if evaluation is not None and evaluation.exists():
        lines += ["", evaluation.read_text().rstrip(),
                  "SMOKE TEST: a tiny model pretrained for a few steps on a few hundred synthetic images. These "
                  "figures show that the chain runs; they say nothing about EchoCare on real ultrasound. "
                  "Run `echocare evaluate` on your own data for numbers that mean something.", "=" * 72]
    print("\n".join(lines), flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return 0


def register(sub) -> None:
    from .cli_args import add_config_args, add_progress_arg
    p = sub.add_parser("demo", help="run the whole chain on synthetic data (the README's main job)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_config_args(p)
    add_progress_arg(p)  # the stages run as subprocesses: $ECHOCARE_PROGRESS carries it to them
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="local pretraining ranks (default: %(default)s)")
    p.add_argument("--stop-after", choices=("shards", "export", "all"), default="all",
                   help="stop after this stage (default: all)")
    p.set_defaults(func=run_demo)
