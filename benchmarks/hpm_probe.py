"""Real data: random vs hpm masks, the same linear probe (issue 16 item 3; docs/hpm.md).

End to end with the product's own CLI (subprocesses of `echocare`), on BUSI or any folder of
class sub-folders (masks beside images, `x_mask.png`, are rejected / left out by the product):

  0. the probe's split: the runner's own group-aware, seeded split (finetune/splits.py, called with
     the probe's config: near-duplicates on one side, stratified per class), written as `split.csv`
     and passed to every probe as `finetune.split_file`;
  1. shards from the TRAINING images of that split only (a mapping file labelling each class
     folder with a breast node of the packaged ontology; the validation images are `exclude:`d,
     so no probe validation image is seen by pretraining, not even unlabelled);
  2. two pretraining runs of the tiny preset from the same seed, identical except
     `mask.strategy=random` vs `mask.strategy=hpm`;
  3. export each, then the same linear probe (same split, seed, epochs, LR);
     plus a reference probe on a randomly initialised encoder of the same architecture
     (`finetune.init=random`, the random arm's export only names the architecture);
  4. one table: strategy | pretraining steps | final L_MIM | accuracy | macro-F1 | AUC (95% bootstrap
     CIs of the runner), plus wall times.

    nice -n 10 .venv/bin/python benchmarks/hpm_probe.py --data /tmp/busi/dataset --out /tmp/hpm_probe \
        --steps 120 --probe-epochs 15

Re-running with the same --out skips the stages whose outputs exist. Work data stays under --out;
nothing is written into the repository. A smoke comparison (tiny model, CPU, few steps), not
evidence about EchoCare at scale.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Class folder -> ontology node (echocare_dist/configs/ontology/default.yaml: breast: [breast_mass, breast_cyst]).
# Benign BUSI lesions are masses of several kinds (not only cysts), so both lesion classes are breast_mass.
CLASS_NODES = {"benign": ["breast_mass"], "malignant": ["breast_mass"], "normal": ["breast"]}


def echocare_bin() -> list[str]:
    exe = Path(sys.executable).with_name("echocare")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "echocare_dist.cli"]


def run(step: str, argv: list[str], log: Path, times: dict) -> None:
    cmd = echocare_bin() + argv
    print(f"\n=== {step}\n$ echocare {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    t0 = time.time()
    with open(log, "ab") as fh:
        fh.write(f"\n=== {step}\n$ {' '.join(shlex.quote(c) for c in cmd)}\n".encode())
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    times[step] = time.time() - t0
    print(f"    exit {proc.returncode} after {times[step]:.0f} s (log {log})", flush=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"step '{step}' failed with exit code {proc.returncode}:\n" + "\n".join(tail))


def sets(*items: str) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def probe_items(args, data: Path, run_dir: Path) -> list[str]:
    items = ["finetune.task=classification", f"finetune.data={data}", "finetune.mode=linear_probe",
             f"finetune.epochs={args.probe_epochs}", f"finetune.lr={args.probe_lr}", "finetune.warmup_epochs=1",
             "finetune.early_stop_patience=0", f"finetune.seed={args.seed}", f"finetune.bootstrap={args.bootstrap}",
             "finetune.device=cpu", f"finetune.run_dir={run_dir}", "tracking.enabled=false"]
    return items


def probe_args(args, data: Path, run_dir: Path, checkpoint: str, split_file: Path) -> list[str]:
    items = probe_items(args, data, run_dir) + [f"finetune.checkpoint={checkpoint}", f"finetune.split_file={split_file}"]
    return ["finetune", "--config", args.config, *sets(*items), "--no-progress"]


def make_split(args, data: Path, split_csv: Path) -> None:
    """The split `echocare finetune` would draw with this config (runner.py: discover -> splits_for)."""
    sys.path.insert(0, str(REPO))
    from echocare_dist.config import load_config
    from echocare_dist.finetune.data import write_split
    from echocare_dist.finetune.discovery import discover
    from echocare_dist.finetune.splits import splits_for
    cfg = load_config(args.config, probe_items(args, data, split_csv.parent / "unused"))
    task = discover(cfg.finetune, cfg.resolve_path)
    train, val = splits_for(task, cfg.finetune, cfg.resolve_path)[0]
    write_split(split_csv, train, val)


def read_split(split_csv: Path, data: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(split_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            p = Path(row["path"])
            rel = p.relative_to(data) if p.is_absolute() else p
            out.setdefault(row["split"], []).append(rel.as_posix())
    return out


def write_mapping(path: Path, data: Path, val_files: list[str]) -> None:
    import yaml
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    unknown = [c for c in classes if c not in CLASS_NODES]
    if unknown:
        raise SystemExit(f"no ontology node for class folder(s) {unknown}; extend CLASS_NODES")
    mapping = {"sources": [{
        "name": "BUSI", "root": str(data), "labels": ["breast"], "deid": False,
        "rules": [{"glob": f"{c}/*", "labels": CLASS_NODES[c]} for c in classes],
        # the probe's validation images: never seen by pretraining. Globs use fnmatch: escape [ ] ? *
        "exclude": [v.replace("[", "[[]").replace("?", "[?]").replace("*", "[*]") for v in val_files]
                   + ["*.txt"],
    }]}
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))


def last_record(metrics_jsonl: Path) -> dict:
    rec = {}
    for line in metrics_jsonl.read_text().splitlines():
        r = json.loads(line)
        if "loss_mim" in r:
            rec = r
    return rec


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["final"]


def fmt_ci(final: dict, k: str) -> str:
    lo, hi = final[f"{k}_ci"]
    return f"{final[k]:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/busi/dataset", help="class folders (BUSI layout)")
    ap.add_argument("--out", default="/tmp/hpm_probe")
    ap.add_argument("--config", default="tiny_cpu")
    ap.add_argument("--steps", type=int, default=120, help="pretraining optimizer steps per arm")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--hpm-warmup", type=int, default=0,
                    help="mask.hpm_warmup_steps of the hpm arm (0 = half of --steps, so the mined share "
                         "reaches mask.hpm_ratio mid-run)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of both arms and finetune.seed of every probe")
    ap.add_argument("--probe-epochs", type=int, default=15)
    ap.add_argument("--probe-lr", type=float, default=5e-3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()

    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "hpm_probe.log"
    times: dict[str, float] = {}
    hpm_warmup = args.hpm_warmup or max(1, args.steps // 2)

    # 0. the probe split, by the runner's own code with the probe's config
    split_csv = out / "split.csv"
    if not split_csv.exists():
        make_split(args, data, split_csv)
    split = read_split(split_csv, data)
    print(f"split: {len(split.get('train', []))} train / {len(split.get('val', []))} val images", flush=True)

    # 1. shards from the training images only
    mapping, shards = out / "busi_mapping.yaml", out / "shards"
    write_mapping(mapping, data, split.get("val", []))
    if not (shards / "manifest.json").exists():
        run("build shards (probe-train images only)",
            ["shards", "build", "--config", args.config, "--mapping", str(mapping), "--out", str(shards),
             "--no-progress"], log, times)
    manifest = json.loads((shards / "manifest.json").read_text())

    # 2.-3. pretrain each arm, export, probe
    rows = []
    for strategy in ("random", "hpm"):
        run_dir, export, probe = out / f"pretrain_{strategy}", out / f"export_{strategy}", out / f"probe_{strategy}"
        items = [f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.steps={args.steps}",
                 f"train.micro_batch={args.micro_batch}", f"train.seed={args.seed}", "train.grad_accum=1",
                 f"train.ckpt_every={args.steps}", f"train.image_every={args.steps}", "train.log_every=10",
                 "train.val_every=0", "data.device=cpu", "tracking.enabled=false", f"mask.strategy={strategy}"]
        if strategy == "hpm":
            items.append(f"mask.hpm_warmup_steps={hpm_warmup}")
        if not (export / "encoder.safetensors").exists():
            run(f"pretrain ({strategy})", ["pretrain", "--config", args.config, *sets(*items)], log, times)
            run(f"export ({strategy})", ["export", str(run_dir), "--out", str(export), "--no-progress",
                                         "--no-track", "--license", "CC-BY-4.0"], log, times)
        if not (probe / "metrics.json").exists():
            run(f"linear probe ({strategy})",
                probe_args(args, data, probe, str(export / "encoder.safetensors"), split_csv), log, times)
        rec = last_record(run_dir / "metrics.jsonl")
        rows.append((strategy, rec.get("step", args.steps), rec.get("loss_mim", float("nan")), final_metrics(probe),
                     times.get(f"pretrain ({strategy})"), times.get(f"linear probe ({strategy})")))
    # reference: the same probe on a randomly initialised encoder of the same architecture
    ref_dir = out / "probe_random_init"
    if not (ref_dir / "metrics.json").exists():
        ref_args = probe_args(args, data, ref_dir, str(out / "export_random" / "encoder.safetensors"), split_csv)
        run("linear probe (random init)", ref_args + ["--set", "finetune.init=random"], log, times)
    ref = final_metrics(ref_dir)

    def wall(t):
        return f"{t:.0f} s" if t is not None else "(cached)"

    lines = [f"hpm_probe: {data} ({manifest.get('num_samples')} pretraining samples; "
             f"{len(split.get('train', []))} probe-train / {len(split.get('val', []))} probe-val images), "
             f"{args.config}, seed {args.seed}, micro-batch {args.micro_batch}, hpm ramp {hpm_warmup} steps; "
             f"linear probe {args.probe_epochs} epochs, lr {args.probe_lr}; value [95% bootstrap CI]",
             "",
             "| strategy | pretraining steps | final L_MIM | probe accuracy | macro-F1 | AUC | pretrain wall | probe wall |",
             "|---|---|---|---|---|---|---|---|"]
    for strategy, steps, mim, fin, tp, tf in rows:
        lines.append(f"| {strategy} | {steps} | {mim:.4f} | {fmt_ci(fin, 'accuracy')} | {fmt_ci(fin, 'macro_f1')} | "
                     f"{fmt_ci(fin, 'auc')} | {wall(tp)} | {wall(tf)} |")
    lines.append(f"| (no pretraining: random init) | 0 | - | {fmt_ci(ref, 'accuracy')} | {fmt_ci(ref, 'macro_f1')} | "
                 f"{fmt_ci(ref, 'auc')} | - | {wall(times.get('linear probe (random init)'))} |")
    lines += ["", "wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
              f"host: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}"]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
