"""One device vocabulary, why CUDA is unusable, and which GPU a rank takes.

Vocabulary (train.device, data.device, finetune.device, $ECHOCARE_DEVICE of slurm/pretrain.sh):
`auto` (CUDA when usable, else the CPU), `cuda`, `cpu`, `cuda:N` (one process only), and `gpu`
as an alias of `cuda`. `config_sections.parse_device` (config validation needs it without this
module) returns the canonical spelling, so code compares with "cuda", never with an alias.

A job that asked for CUDA -- in its config, in $ECHOCARE_DEVICE, or by being given GPUs by
Slurm (SLURM_GPUS*, SLURM_JOB_GPUS; not CUDA_VISIBLE_DEVICES, which launchers set anyway) -- must not
quietly train on the CPU 1000x slower when CUDA is not usable: `cuda_problem` names the cause
(CPU-only torch, no driver, a driver too old for the wheel, no visible device) for the pre-flight.
`rank_device` maps a rank to its GPU under both per-task binding and whole-node visibility.

Nothing here imports torch at module level: config validation uses this module without it.
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Mapping

from .config_sections import ConfigError, parse_device

ENV_VAR = "ECHOCARE_DEVICE"
PROC_DRIVER_VERSION = "/proc/driver/nvidia/version"


class DeviceError(ConfigError):
    """A device request that cannot be met; a ConfigError, so every CLI exits with code 2."""


def train_device_spec(train_device: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """(key that decided, canonical spec): train.device, else $ECHOCARE_DEVICE when train.device=auto."""
    spec = parse_device(train_device, "train.device")
    if spec == "auto" and environ.get(ENV_VAR, "").strip():
        return ENV_VAR, parse_device(environ[ENV_VAR], ENV_VAR)
    return "train.device", spec


# ------------------------------------------------------------------ was CUDA asked for?
_GPU_ALLOCATION_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS",
                        "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")


def _allocated(value: str) -> bool:
    """A Slurm GPU count/list/spec that gives the job at least one GPU ('0' and '' give none)."""
    value = value.strip()
    return bool(value) and value not in ("0", "none", "(null)") and not re.fullmatch(r"(\w+:)?0", value)


def cuda_request(cfg, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(key, value) of the first thing that asks this process for CUDA, or None.

    An explicit cpu (train.device or $ECHOCARE_DEVICE) overrides GPUs the scheduler handed out:
    the job chose to leave them idle. (data.device=cuda is the pre-flight's `check_device`: only
    the DALI reader decodes on a GPU.)"""
    key, spec = train_device_spec(cfg.train.device, environ)
    if spec.startswith("cuda"):
        return key, spec
    if spec == "cpu":
        return None
    for var in _GPU_ALLOCATION_VARS:
        if _allocated(environ.get(var, "")):
            return var, environ[var]
    # CUDA_VISIBLE_DEVICES alone is no request: DeepSpeed's launcher sets it on every machine,
    # CPU-only ones included (`deepspeed --num_gpus 2` exports CUDA_VISIBLE_DEVICES=0,1 there).
    return None


# ------------------------------------------------------------------ what the machine says
# Module-level functions so tests fake each query (monkeypatch) without a GPU or a driver.
def torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built for ('13.0'), None for a CPU-only build."""
    import torch
    return torch.version.cuda


def torch_device_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def driver_present() -> bool:
    return os.path.exists(PROC_DRIVER_VERSION) or _libcuda() is not None


def driver_cuda_version() -> int | None:
    """The newest CUDA the driver supports, as cuDriverGetVersion reports it (13000 = 13.0), or None.
    Asked of libcuda directly: it answers even when torch refuses the driver."""
    lib = _libcuda()
    if lib is None:
        return None
    out = ctypes.c_int(0)
    return out.value if lib.cuDriverGetVersion(ctypes.byref(out)) == 0 and out.value > 0 else None


def driver_device_count() -> int | None:
    """Devices the driver shows this process (after CUDA_VISIBLE_DEVICES), or None if it cannot say."""
    lib = _libcuda()
    if lib is None:
        return None
    if lib.cuInit(0) != 0:  # CUDA_ERROR_NO_DEVICE (100) among others
        return 0
    out = ctypes.c_int(0)
    return out.value if lib.cuDeviceGetCount(ctypes.byref(out)) == 0 else None


def _version_text(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _as_driver_int(torch_cuda: str) -> int | None:
    m = re.match(r"(\d+)\.(\d+)", torch_cuda)
    return int(m.group(1)) * 1000 + int(m.group(2)) * 10 if m else None


def cuda_problem(environ: Mapping[str, str]) -> str | None:
    """None when CUDA is usable here, else the cause in one sentence (for the pre-flight report)."""
    if torch_cuda_available():
        return None
    built = torch_cuda_version()
    if built is None:
        return ("this torch is a CPU-only build (torch.version.cuda is None): install the CUDA build "
                "of torch (scripts/install.sh; docs/cluster.md, 'CUDA builds and drivers')")
    if not driver_present():
        return (f"no NVIDIA driver: torch.cuda.is_available() is false and neither {PROC_DRIVER_VERSION} "
                "nor libcuda.so.1 exists (a container started without --gpus / --nv, or a CPU node?)")
    driver, needed = driver_cuda_version(), _as_driver_int(built)
    if driver is not None and needed is not None and driver < needed:
        return (f"NVIDIA driver too old for this torch: the driver supports CUDA {_version_text(driver)}, "
                f"torch {built} needs a driver for CUDA {built} (CUDA 13 wheels: R580 or newer); update the "
                "driver or install the CUDA 12 builds of torch and DALI (docs/cluster.md)")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    count = driver_device_count()
    if count == 0 or (visible is not None and visible.strip() in ("", "-1", "NoDevFiles")):
        shown = "unset" if visible is None else repr(visible)
        return (f"no visible CUDA device (the driver shows {count if count is not None else 'none'}; "
                f"CUDA_VISIBLE_DEVICES={shown})")
    driver_text = _version_text(driver) if driver is not None else "unknown"
    return (f"torch.cuda.is_available() is false (driver CUDA {driver_text}, torch built for CUDA {built}, "
            f"{count if count is not None else 'unknown'} device(s) visible to the driver)")


# ------------------------------------------------------------------ rank -> device
def local_world_size(environ: Mapping[str, str]) -> int | None:
    """Ranks on this node, from the launcher (torchrun/our Slurm script, the DeepSpeed launcher, srun)."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if environ.get(var, "").strip().isdigit():
            return int(environ[var])
    m = re.match(r"\s*(\d+)", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))  # "8(x2)" or "4,3"
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Placement:
    kind: str                 # "cpu" or "cuda"
    index: int | None         # CUDA device ordinal for "cuda"
    why: str                  # one phrase for the start-up line

    def torch_device(self):
        import torch
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)


def rank_device(spec: str, *, local_rank: int, local_ranks: int | None, world_size: int,
                visible: int, key: str = "train.device") -> Placement:
    """Where one rank runs, given how many CUDA devices it sees (`visible`, 0 = CUDA unusable).

    One visible device: device 0 (per-task binding: --gpus-per-task=1, --gpu-bind, one GPU per
    container). At least as many as the node's ranks: cuda:LOCAL_RANK. More than one but fewer
    than the node's ranks: two ranks would share a GPU silently, so it is an error."""
    spec = parse_device(spec, key)
    if spec == "cpu" or (spec == "auto" and visible == 0):
        return Placement("cpu", None, "CPU" if spec == "cpu" else "CPU (no usable CUDA device)")
    if visible == 0:
        raise DeviceError(f"{key}={spec}: CUDA is not usable in this process (0 visible devices)")
    if spec.startswith("cuda:"):
        index = int(spec.split(":")[1])
        if world_size > 1:
            raise DeviceError(f"{key}={spec}: a device index fits a single process, this run has {world_size} "
                              "ranks (use cuda: each rank takes its local rank's GPU)")
        if index >= visible:
            raise DeviceError(f"{key}={spec}: only {visible} CUDA device(s) are visible")
        return Placement("cuda", index, f"{spec} (configured)")
    if visible == 1:
        return Placement("cuda", 0, "the one visible GPU (per-task binding)")
    ranks = local_ranks if local_ranks is not None else local_rank + 1
    if visible < ranks or local_rank >= visible:
        raise DeviceError(f"{visible} CUDA devices are visible but this node runs {max(ranks, local_rank + 1)} "
                          f"local ranks (LOCAL_RANK={local_rank}): two ranks would share a GPU; bind one GPU "
                          "per task (--gpus-per-task=1) or make every GPU visible to every rank")
    return Placement("cuda", local_rank, f"GPU {local_rank} of {visible} (LOCAL_RANK)")
