"""Memory, the per-log-step window of training values and the JSONL metrics log.

MFU = achieved model FLOPs / peak FLOPs of the device, with model FLOPs per image from
`echocare_dist.models.flops_per_image` (3 x forward, recomputation not counted) and the peak
from `echocare_dist.hardware.peak_tflops` (train.peak_tflops, the dense spec table, or measured).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_text


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
