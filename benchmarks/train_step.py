"""Train-step benchmark: the real pretraining step on N local ranks, fed by real shards.

Each configuration (preset x ZeRO stage) runs as its own group of ranks, started by
torch.distributed.run (gloo on CPU, NCCL on GPUs) on this script's worker mode. Every rank builds
the trainer's own components (echocare_dist.train.step.build_components: DeepSpeed engine, client
AdamW and schedule, fused losses, the loader over shards written by
echocare_dist.data.testing.write_shards) and times `train_step`, the function the training loop
calls. Figures: global images/s, step time, data wait per step (mean and max over ranks),
MFU = 3 x analytic forward FLOPs x images/s per device / peak (echocare_dist.hardware: the dense
spec table on known GPUs, else a measured matmul rate), peak memory of the busiest rank.

    python benchmarks/train_step.py                                   # tiny_cpu, 2 CPU ranks, ZeRO-2
    python benchmarks/train_step.py --zero 0 1 2 3 --nproc 4
    python benchmarks/train_step.py --presets echocare_swin_l_p4 echocare_swin_b --nproc 1   # CPU: batch 1
    python benchmarks/train_step.py --presets echocare_swin_l --nproc 8 --set train.precision=bf16  # a GPU node
    python benchmarks/train_step.py --compile none blocks             # eager vs regional torch.compile

With --compile, each configuration runs once per model.compile mode and the script prints the
img/s of each beside the eager one (the compile itself happens in the untimed warmup steps).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from importlib.metadata import version
from pathlib import Path

from hardware import REPO, describe  # benchmarks/hardware.py (the script's folder is on sys.path)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "echocare" / "torch_extensions"))

import torch  # noqa: E402

from echocare_dist.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from echocare_dist.config import load_config  # noqa: E402
from echocare_dist.models import flops_per_image  # noqa: E402
from echocare_dist.ontology import load_ontology  # noqa: E402

PRESETS = ("tiny_cpu", "echocare_swin_b", "echocare_swin_l_p4", "echocare_swin_l")
CPU_MAX_STEP_GFLOP = 50.0   # default CPU micro-batch: the largest whose train step stays under this


# ------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of this rank while its components exist. CUDA: the allocator's peak. CPU:
    resident set size sampled every 5 ms, minus the RSS at the start (freed heap trimmed first)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type != "cuda":
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- one rank
def worker(args) -> int:
    """One rank of one configuration: components, warmup, timed steps; rank 0 writes the row."""
    from echocare_dist import hardware
    from echocare_dist.data import resolve_loader_kind
    from echocare_dist.train import distributed
    from echocare_dist.train.step import build_components, train_step

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for name in ("echocare_dist", "DeepSpeed"):  # setup chatter would bury the table
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = load_config(args.preset, args.overrides)
    env = distributed.init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
    device = env.device
    with PeakMemory(device) as mem:
        c = build_components(cfg, env, run_dir=cfg.resolve_path(cfg.train.run_dir))
        for _ in range(args.warmup):
            train_step(c)
        _sync(device)
        distributed.barrier()
        t0 = time.perf_counter()
        wait = 0.0
        for _ in range(args.steps):
            result = train_step(c)
            wait += result.data_wait_s
        loss = float(result.loss.item())  # also waits for the device
        elapsed = time.perf_counter() - t0
    peak, source = c.peak_tflops, c.peak_source
    if source.startswith("measured"):
        # Measured again after the run and the better kept: a busy machine only ever lowers it.
        peak = max(peak, hardware.peak_tflops(device, cfg.train.precision)[0])
    (wait_sum,), (wait_max, elapsed_max, mem_max, peak_max) = distributed.reduce_stats(
        [wait], [wait, elapsed, float(mem.bytes), peak], device)
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"non-finite loss {loss} in {args.preset} ZeRO-{cfg.train.zero_stage}")
    if env.is_main:
        images_per_s = c.global_batch * args.steps / elapsed_max
        tflops = c.flops["train"] * images_per_s / env.world_size / 1e12
        m = cfg.model
        atomic_write_json(args.result, dict(
            preset=args.preset, arch=m.arch.split("_")[1], patch=m.patch_size, img=m.img_size,
            ranks=env.world_size, zero=cfg.train.zero_stage, batch=cfg.train.micro_batch,
            accum=cfg.train.grad_accum, precision=cfg.train.precision, loader=resolve_loader_kind(cfg, device),
            gflop_fwd=c.flops["forward"] / 1e9, images_per_s=images_per_s, step_s=elapsed_max / args.steps,
            data_wait_s=wait_sum / env.world_size / args.steps, data_wait_max_s=wait_max / args.steps,
            tflops=tflops, peak_tflops=peak_max, peak_source=source, mfu=tflops / peak_max,
            peak_gib=mem_max / 2 ** 30, loss=loss, threads=torch.get_num_threads(), device=str(device),
            compile=c.compile))
    c.loader.close()
    c.engine.destroy()
    distributed.barrier()
    distributed.shutdown()
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- driver
def default_batch(cfg, gpu: bool, num_nodes: int) -> int:
    """The preset's micro-batch on a GPU; on a CPU the largest one under CPU_MAX_STEP_GFLOP."""
    if gpu:
        return cfg.train.micro_batch
    step_gflop = flops_per_image(cfg.model, num_nodes)["train"] / 1e9
    return max(1, min(cfg.train.micro_batch, int(CPU_MAX_STEP_GFLOP // step_gflop)))


def write_benchmark_shards(root: Path, cfg, ontology, samples: int) -> None:
    """B-mode-like images a little larger than the model input (the loader crops and resizes them)."""
    from echocare_dist.data.testing import write_shards

    side = cfg.model.img_size
    per_shard = max(1, -(-samples // 4))
    write_shards(root, ontology, counts=(per_shard,) * 4, size=(side * 5 // 4, side), pattern="ultrasound",
                 distinct_images=min(64, samples))


def run_config(args, preset: str, zero: int, shards: Path, work: Path, batch: int, compile_mode: str) -> dict:
    tag = f"{preset}_zero{zero}_{compile_mode}"
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    overrides = [f"data.shards={shards}", f"train.run_dir={work / tag}", f"train.zero_stage={zero}",
                 f"train.micro_batch={batch}", f"train.steps={args.warmup + args.steps}",
                 "train.resume=none", "tracking.enabled=false", f"model.compile={compile_mode}", *args.overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "--max_restarts=0", str(Path(__file__).resolve()), "--worker", "--preset", preset,
           "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "wb") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{tag}: the ranks exited with {rc} (log {log}):\n{tail}")
    return json.loads(result.read_text())


COLUMNS = [("preset", "{}"), ("arch", "{}"), ("patch", "{}"), ("ranks", "{}"), ("zero", "{}"), ("compile", "{}"),
           ("batch", "{}"), ("accum", "{}"), ("precision", "{}"), ("gflop_fwd", "{:.4g}"),
           ("images_per_s", "{:.2f}"), ("step_s", "{:.3f}"), ("data_wait_s", "{:.4f}"),
           ("data_wait_max_s", "{:.4f}"), ("tflops", "{:.3g}"), ("mfu", "{:.2%}"), ("peak_gib", "{:.2f}")]


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def compile_comparison(rows: list[dict]) -> list[str]:
    """'eager X img/s vs blocks Y img/s (Zx)' per preset and ZeRO stage that ran both."""
    lines = []
    for (preset, zero) in dict.fromkeys((r["preset"], r["zero"]) for r in rows):
        group = {r["compile"]: r["images_per_s"] for r in rows if (r["preset"], r["zero"]) == (preset, zero)}
        eager = group.get("none")
        for mode, ips in group.items():
            if mode != "none" and eager:
                lines.append(f"{preset} ZeRO-{zero}: eager {eager:.2f} img/s vs compile={mode} {ips:.2f} img/s "
                             f"({ips / eager:.2f}x)")
    return lines


def header_for(args, rows: list[dict]) -> str:
    first = rows[0]
    peaks = sorted({f"{r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']})" for r in rows})
    return (f"# train step benchmark (echocare_dist.train.step: build_components + train_step), "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
            f"hardware: {describe()}\n"
            f"ranks: {args.nproc} x {first['device']} (torch.distributed.run), {first['threads']} torch "
            f"threads each; loader {first['loader']} over write_shards 'ultrasound' JPEGs; peak per device: "
            f"{'; '.join(peaks)}\n"
            f"torch {torch.__version__}, deepspeed {version('deepspeed')}; {args.warmup} warmup + "
            f"{args.steps} timed steps; extra overrides: {' '.join(args.overrides) or '-'}\n"
            f"images_per_s is global; data_wait = loader wait per step (mean over ranks, max); "
            f"MFU = 3 x analytic forward FLOPs (1 multiply-add = 2 FLOPs) x images/s per device / peak; "
            f"peak_gib = {'torch.cuda.max_memory_allocated' if 'cuda' in first['device'] else 'sampled RSS increase'}"
            f" of the busiest rank")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny_cpu"], choices=PRESETS)
    ap.add_argument("--zero", nargs="+", type=int, default=[2], choices=[0, 1, 2, 3])
    ap.add_argument("--nproc", type=int, default=2, help="local ranks per configuration (default: 2)")
    ap.add_argument("--batch", type=int, default=None,
                    help=f"micro-batch per rank (default: the preset's on GPUs; on a CPU the largest whose "
                         f"train step stays under {CPU_MAX_STEP_GFLOP:g} GFLOP, i.e. 1 for Swin-B/L)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 GPU, 1 CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every configuration, e.g. train.precision=bf16")
    ap.add_argument("--compile", nargs="+", default=["auto"], choices=["auto", "none", "blocks", "full"],
                    help="model.compile modes to run each configuration with (default: auto = blocks on "
                         "CUDA, none on CPU); e.g. --compile none blocks compares eager and compiled img/s")
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: hide the GPUs from the ranks")
    ap.add_argument("--out", default="", help="also write the table (.md) and rows (.json) here, atomically")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("nproc", "batch", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    gpu = args.device == "auto" and torch.cuda.is_available()
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    print(f"{len(args.presets) * len(args.zero) * len(args.compile)} configurations x {args.nproc} ranks on "
          f"{describe()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="echocare-train-step-") as tmp:
        work = Path(tmp)
        for preset in args.presets:
            cfg = load_config(preset, args.overrides)
            ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
            batch = args.batch or default_batch(cfg, gpu, len(ontology))
            # Enough samples that the timed steps stay inside the first epoch (no reader restart).
            samples = args.nproc * batch * cfg.train.grad_accum * (args.warmup + args.steps + 1)
            shards = work / f"shards_{preset}"
            write_benchmark_shards(shards, cfg, ontology, samples)
            for zero in args.zero:
                for mode in args.compile:
                    row = run_config(args, preset, zero, shards, work, batch, mode)
                    rows.append(row)
                    print(f"  {preset} ZeRO-{zero} compile {row['compile']}: {row['images_per_s']:.2f} img/s, "
                          f"MFU {row['mfu']:.2%}, data wait {row['data_wait_s']:.4f} s/step, "
                          f"peak {row['peak_gib']:.2f} GiB", flush=True)
    table = format_table(rows, header_for(args, rows))
    print("\n" + table, flush=True)
    for line in compile_comparison(rows):
        print(line, flush=True)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_suffix(".md"), table + "\n")
        atomic_write_json(out.with_suffix(".json"), dict(header=table.split("\n\n")[0], rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
