"""Train-step benchmark: images/s, MFU and peak memory per rank for Swin-T/B/L x patch 4/2 x ZeRO 0-3.

One process (world size 1) drives a real `deepspeed.initialize` engine per configuration on
synthetic tensors already on the device, so the figures measure model + DeepSpeed, not data.
MFU = flops_per_image(...)["train"] (3 x analytic forward, recomputation not counted) x images/s
/ device peak (bf16 dense: H100/H200 989, A100 312 TFLOP/s; CPU and unknown devices: a measured
matmul peak in the benchmark's precision).

    python benchmarks/train_step.py                      # CPU: batch 1, skips Swin-B/L at patch 2
    python benchmarks/train_step.py --all                # everything
    python benchmarks/train_step.py --archs L --patches 4 --zero 2 --batch 32   # H100 target row
    python benchmarks/train_step.py --base-config tiny_cpu --archs preset --zero 0 3   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "echocare" / "torch_extensions"))

import torch  # noqa: E402

from echocare_dist.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from echocare_dist.config import load_config  # noqa: E402
from echocare_dist.models import build_model, flops_per_image, param_groups  # noqa: E402
from echocare_dist.ontology import load_ontology  # noqa: E402

ARCHS = {"T": "swin_tiny_patch4_window7_224", "B": "swin_base_patch4_window7_224",
         "L": "swin_large_patch4_window7_224", "preset": None}

# Dense (no sparsity) tensor-core peaks in FLOP/s; first matching substring of the device name wins.
GPU_PEAKS_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("GH200", 989e12), ("A100", 312e12)]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------- hardware
def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best square-matmul rate over a couple of seconds: the fastest run is the one least disturbed
    by other work on the machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s for MFU: the spec sheet for known GPUs in bf16, else a measurement."""
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS_BF16:
            if key in name:
                return peak, f"{key} bf16 dense spec"
    return measured_matmul_peak(device, DTYPES[precision]), f"measured {precision} matmul"


def hardware_line(device: torch.device) -> str:
    return f"{describe()}, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of this rank during a configuration. CUDA: the allocator's peak. CPU: resident
    set size sampled every 5 ms, minus the RSS at the start (freed heap is trimmed back first)."""

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


# ------------------------------------------------------------------------------- losses
def make_loss_fn(ontology, patch_size: int, device: torch.device):
    """The project's losses when echocare_dist.kernels provides them, else a plain masked L1 + BCE."""
    try:
        from echocare_dist.kernels import hierarchical_minmax_loss, masked_l1_loss
    except ImportError:
        hierarchical_minmax_loss = masked_l1_loss = None
    if masked_l1_loss is not None:
        anc = torch.tensor(ontology.ancestor_table, device=device)  # copies: the tables are read-only
        desc = torch.tensor(ontology.descendant_table, device=device)

        def loss_fn(out, target, mask, labels):
            return (masked_l1_loss(out["recon"], target, mask, patch_size, "auto")
                    + hierarchical_minmax_loss(out["logits"], labels, anc, desc, "auto"))
        return loss_fn, "kernels"

    def fallback(out, target, mask, labels):
        w = mask.to(out["recon"].dtype).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
        mim = ((out["recon"] - target).abs() * w.unsqueeze(1)).sum() / w.sum().clamp(min=1)
        known = labels >= 0
        hie = torch.nn.functional.binary_cross_entropy_with_logits(
            out["logits"][known], labels[known].to(out["logits"].dtype))
        return mim + hie
    return fallback, "fallback L1+BCE"


# ------------------------------------------------------------------------------- one config
def ds_config(batch: int, zero_stage: int, precision: str, grad_clip: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "wall_clock_breakdown": False,
    }


def run_config(cfg, arch_label, zero_stage, args, device, ontology) -> dict:
    import deepspeed

    model_cfg = cfg.model
    flops = flops_per_image(model_cfg, ontology.num_nodes)
    row = dict(arch=arch_label, patch=model_cfg.patch_size, zero=zero_stage, batch=args.batch,
               ckpt=model_cfg.grad_checkpointing, gflop_fwd=flops["forward"] / 1e9)
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = build_model(model_cfg, ontology.num_nodes).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=ds_config(args.batch, zero_stage, args.precision,
                                                           cfg.optim.grad_clip))
        loss_fn, loss_name = make_loss_fn(ontology, model_cfg.patch_size, device)
        batch = synthetic_batch(model_cfg, args.batch, ontology, device, DTYPES[args.precision])
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync(device)
                start = time.perf_counter()
            out = engine(batch["input"], batch["mask"])
            loss = loss_fn(out, batch["target"], batch["mask"], batch["labels"])
            engine.backward(loss)
            engine.step()
        sync(device)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss.detach()).item():
            raise RuntimeError(f"non-finite loss {loss.item()} in {row}")
        engine.destroy()
        del engine, model, optimizer, out, loss, batch
    images_per_s = args.batch * args.steps / elapsed
    row.update(images_per_s=images_per_s, step_s=elapsed / args.steps,
               tflops=flops["train"] * images_per_s / 1e12, peak_gib=mem.bytes / 2 ** 30, loss=loss_name)
    return row


def synthetic_batch(model_cfg, batch: int, ontology, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    size, grid = model_cfg.img_size, model_cfg.img_size // model_cfg.patch_size
    target = torch.rand(batch, model_cfg.in_chans, size, size, generator=g)
    mask = (torch.rand(batch, grid, grid, generator=g) < 0.5).to(torch.uint8)
    names = [[ontology.names[int(torch.randint(ontology.num_nodes, (1,), generator=g))]] for _ in range(batch)]
    labels = torch.as_tensor(ontology.label_matrix(names))
    return dict(input=((target - 0.5) / 0.5).to(device, dtype), target=target.to(device),
                mask=mask.to(device), labels=labels.to(device))


# ------------------------------------------------------------------------------- driver
def init_single_process(device: torch.device) -> None:
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # one INFO block per engine would bury the table
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:  # a free port, so two benchmarks on one host never collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def plan(args, device) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(arch, patch, zero) to run, and the (arch, patch) skipped as too slow for a CPU."""
    runs, skipped = [], []
    for arch in args.archs:
        for patch in args.patches:
            cfg = config_for(args, arch, patch)
            step_gflop = args.batch * flops_per_image(cfg.model, 1)["train"] / 1e9
            if device.type == "cpu" and not args.all and step_gflop > args.cpu_max_gflop:
                skipped.append(f"{arch} p{patch} ({step_gflop:.0f} GFLOP/step)")
                continue
            runs += [(arch, patch, z) for z in args.zero]
    return runs, skipped


def config_for(args, arch: str, patch: int):
    overrides = [f"model.patch_size={patch}"] + ([f"model.arch={ARCHS[arch]}"] if ARCHS[arch] else [])
    cfg = load_config(args.base_config, overrides)
    ckpt = {"on": True, "off": False}.get(args.grad_ckpt, patch == 2)  # auto: on for patch 2 (paper preset)
    cfg.model = dataclasses.replace(cfg.model, grad_checkpointing=ckpt)
    return cfg


def format_table(rows: list[dict], header: str) -> str:
    cols = [("arch", "{}"), ("patch", "{}"), ("zero", "{}"), ("batch", "{}"), ("ckpt", "{}"),
            ("gflop_fwd", "{:.4g}"), ("images_per_s", "{:.2f}"), ("step_s", "{:.3f}"), ("tflops", "{:.3g}"), ("mfu", "{:.1%}"),
            ("peak_gib", "{:.2f}")]
    lines = [header, "", "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in cols) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-config", default="echocare_swin_l",
                    help="preset giving image size, window, decoder, optimizer (default: the paper's)")
    ap.add_argument("--archs", nargs="+", default=["T", "B", "L"], choices=sorted(ARCHS))
    ap.add_argument("--patches", nargs="+", type=int, default=[4, 2])
    ap.add_argument("--zero", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=None, help="micro batch per rank (default: 32 GPU, 1 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 GPU, 1 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 GPU, 1 CPU)")
    ap.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 GPU, fp32 CPU")
    ap.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto",
                    help="gradient checkpointing; auto = on at patch 2 (as the paper preset)")
    ap.add_argument("--all", action="store_true", help="on CPU, also run the models over --cpu-max-gflop")
    ap.add_argument("--cpu-max-gflop", type=float, default=400.0,
                    help="on CPU, skip models whose train step exceeds this many GFLOP (Swin-B/L at "
                         "patch 2: minutes per step on a few cores) unless --all")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--out", default="", help="also write the table (.md) and rows (.json) here, atomically")
    args = ap.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or (args.steps is not None and args.steps < 1):
        ap.error("--batch and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.batch = args.batch or (32 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    init_single_process(device)
    base = load_config(args.base_config)
    ontology = load_ontology(base.resolve_path(base.ontology.path))
    peak_flops, peak_source = device_peak(device, args.precision)
    runs, skipped = plan(args, device)
    print(f"{len(runs)} configurations on {hardware_line(device)}"
          + (f"; skipped on CPU (use --all): {', '.join(skipped)}" if skipped else ""), flush=True)

    rows = []
    for arch, patch, zero in runs:
        row = run_config(config_for(args, arch, patch), arch, zero, args, device, ontology)
        rows.append(row)
        print(f"  {arch} p{patch} zero{zero}: {row['images_per_s']:.2f} img/s, {row['tflops']:.3g} TFLOP/s, "
              f"peak {row['peak_gib']:.2f} GiB ({row['loss']})", flush=True)
    if peak_source.startswith("measured"):
        # Measured again at the end and the better kept: a busy machine only ever lowers the figure.
        peak_flops = max(peak_flops, device_peak(device, args.precision)[0])
    for row in rows:
        row["mfu"] = row["tflops"] * 1e12 / peak_flops

    import deepspeed
    header = (f"# train step benchmark, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
              f"hardware: {hardware_line(device)}; peak {peak_flops / 1e12:.3g} TFLOP/s ({peak_source})\n"
              f"torch {torch.__version__}, deepspeed {deepspeed.__version__}; world size 1; "
              f"{args.precision}; img {base.model.img_size}; base config {args.base_config}; "
              f"{args.warmup} warmup + {args.steps} timed steps; losses: {rows[0]['loss'] if rows else '-'}\n"
              f"MFU = 3 x analytic forward FLOPs (1 multiply-add = 2 FLOPs) x images/s / peak; "
              f"peak mem = {'torch.cuda.max_memory_allocated' if gpu else 'sampled RSS increase'} per rank")
    if skipped:
        header += f"\nskipped on CPU (use --all): {', '.join(skipped)}"
    table = format_table(rows, header)
    print("\n" + table, flush=True)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_suffix(".md"), table + "\n")
        atomic_write_json(out.with_suffix(".json"), dict(header=header, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
