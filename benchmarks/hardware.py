"""One line describing where a benchmark ran: every published figure carries it (with the date).

A GPU is named with its row of the project's peak-FLOPs table (echocare_dist.hardware), the
same figure the trainer's MFU divides by.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benchmarks run from a checkout, installed or not
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_description(index: int = 0) -> str:
    """'NVIDIA H100 80GB HBM3 (CUDA 12.8; peak table H100 SXM: 989.4 bf16 / 494.7 tf32 dense TFLOP/s)'."""
    import torch

    from echocare_dist.hardware import PEAK_TFLOPS, match_device

    name = torch.cuda.get_device_name(index)
    key = match_device(name)
    if key is None:
        peak = "not in the peak table: MFU uses a measured matmul rate"
    else:
        row = PEAK_TFLOPS[key]
        peak = f"peak table {key}: {row['bf16']:g} bf16 / {row['tf32']:g} tf32 dense TFLOP/s"
    return f"{name} x{torch.cuda.device_count()} (CUDA {torch.version.cuda}; {peak})"


def describe() -> str:
    """CPU, usable cores, RAM, load, GPU (if any), Python and the date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu_model(), f"{usable} usable cores"]
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        parts.append(f"{kb / 2**20:.0f} GiB RAM")
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f}")
    try:
        import torch
        parts.append(gpu_description() if torch.cuda.is_available() else "no GPU")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    parts.append(datetime.datetime.now().isoformat(timespec="minutes"))
    return ", ".join(parts)
