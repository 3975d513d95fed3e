"""One line describing where a benchmark ran: every published figure carries it (with the date)."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        if torch.cuda.is_available():
            parts.append(f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
        else:
            parts.append("no GPU")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    parts.append(datetime.datetime.now().isoformat(timespec="minutes"))
    return ", ".join(parts)
