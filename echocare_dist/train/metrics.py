"""Throughput, MFU, memory and the JSONL metrics log.

MFU = achieved model FLOPs / peak FLOPs of the device, with model FLOPs per image from
`echocare_dist.models.flops_per_image` (3 x forward, recomputation not counted) and the
peak from `train.peak_tflops`, else the dense spec table below, else (CPU) a short matmul
measurement, which makes CPU MFU a "fraction of achievable matmul rate".
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_text

# Dense (no sparsity) peak TFLOP/s per device by name fragment; "fp32" is the non-tensor-core
# rate that torch uses for fp32 matmuls unless TF32 is allowed.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tf32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2, "tf32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tf32": 494.7},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tf32": 494.7},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0, "tf32": 1100.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6, "tf32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2, "tf32": 62.5},
}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                          seconds: float = 0.2) -> float:
    # A private generator: the global RNG streams belong to training (a resume restores them).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)  # warm-up (threads, kernels)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n ** 3 * iters / elapsed / 1e12


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured > 0:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "fp32"
        if precision in ("bf16", "fp16"):
            key = precision
        elif torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        for fragment, table in PEAK_TFLOPS.items():  # dict order: specific names before general ones
            if fragment in name:
                return table[key], f"spec table ({fragment} {key})"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        return measure_matmul_tflops(device, dtype, n=4096), f"measured ({name} not in the table)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_tflops(device, dtype), "measured CPU matmul"


def memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last call (GiB), or the process RSS on CPU."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return value
    try:
        import psutil
        return psutil.Process(os.getpid()).memory_info().rss / 2**30
    except ImportError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsFile:
    """Append-only JSONL (one object per log step), flushed per line so a crash keeps what was logged."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps past the checkpoint (they are about to be redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a crash
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class Window:
    """Accumulates per-step values between two log steps without forcing a device sync per step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = self.mim = self.hie = None
        self.data_wait = 0.0
        self.excluded_s = 0.0
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Training time in this window, without checkpoint / image time (those are not throughput)."""
        return max(1e-9, time.perf_counter() - self.t0 - self.excluded_s)

    @contextlib.contextmanager
    def excluded(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_s += time.perf_counter() - t0

    def add(self, loss: torch.Tensor, mim: torch.Tensor, hie: torch.Tensor, data_wait: float) -> None:
        loss, mim, hie = loss.detach().float(), mim.detach().float(), hie.detach().float()
        if self.loss is None:
            self.loss, self.mim, self.hie = loss, mim, hie
        else:
            self.loss, self.mim, self.hie = self.loss + loss, self.mim + mim, self.hie + hie
        self.data_wait += data_wait
        self.steps += 1
