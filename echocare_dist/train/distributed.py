"""Process-group setup that works under every launcher we support.

The rank layout comes from the environment (launch_env.detect_env: DeepSpeed launcher, torchrun,
srun, or a plain `python` = a world of one). When the pre-flight met the other ranks (its roll
call, preflight_ranks.py), the group is built on the store it connected; otherwise DeepSpeed
rendezvous through MASTER_ADDR:MASTER_PORT itself. The device follows train.device (pick_device: the one
visible GPU under per-task binding, else cuda:LOCAL_RANK; the CPU when CUDA is not usable and
nothing asked for it -- the pre-flight stops a run that did), and DeepSpeed picks NCCL or gloo.

Besides the main group we keep a gloo "control" group: the step-control vote (control.py:
preemption, peer failure, non-finite steps; every train.preempt_check_every steps) is a
three-integer all-reduce on the host, so it never forces a GPU synchronisation.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from .. import devices
from ..launch_env import detect_env, first_host, take_store  # noqa: F401  (first_host: re-exported)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str               # "deepspeed/torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int, spec: str = "auto", *, world_size: int = 1,
                environ: dict | None = None) -> torch.device:
    """This rank's device (echocare_dist.devices.rank_device: per-task binding, whole-node visibility,
    never two ranks on one GPU); `spec` is train.device, with $ECHOCARE_DEVICE standing in for auto.
    Raises devices.DeviceError (exit code 2) before any process group exists."""
    env = os.environ if environ is None else environ
    key, spec = devices.train_device_spec(spec, env)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    placement = devices.rank_device(spec, local_rank=local_rank, local_ranks=devices.local_world_size(env),
                                    world_size=world_size, visible=visible, key=key)
    if placement.kind == "cuda":
        torch.cuda.set_device(placement.index)
    return placement.torch_device()


_CONTROL_GROUP = None


def prefer_environment_tools() -> None:
    """Put this interpreter's bin folder first on PATH when it ships `ninja`.

    DeepSpeed JIT-builds an op with torch's cpp_extension, which runs whatever `ninja` PATH
    finds. A venv used without activation would mix the venv's ninja (1.13) with the system's
    (1.11); their build logs hash commands differently, so each start rebuilds the op."""
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")):
        parts = os.environ.get("PATH", "").split(os.pathsep)
        if not parts or parts[0] != bindir:
            os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])


def init_distributed(timeout_s: int, device: str = "auto") -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) plus a gloo control group.
    `device` is train.device; the rank's device is picked (and may fail, exit 2) before any group."""
    import torch.distributed as dist

    global _CONTROL_GROUP
    prefer_environment_tools()
    layout = detect_env()
    # DeepSpeed and torch read the layout from these variables; export the translated Slurm ones.
    for key, value in (("RANK", layout["rank"]), ("WORLD_SIZE", layout["world_size"]),
                       ("LOCAL_RANK", layout["local_rank"]), ("MASTER_ADDR", layout["master_addr"]),
                       ("MASTER_PORT", layout["master_port"])):
        os.environ[str(key)] = str(value)
    device = pick_device(layout["local_rank"], device, world_size=layout["world_size"])
    if device.type == "cpu" and torch.cuda.is_available():
        # train.device=cpu on a GPU machine: DeepSpeed would otherwise pick its CUDA accelerator and NCCL.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    store = take_store()
    if store is not None and not dist.is_initialized():
        # The pre-flight's roll call (preflight_ranks.py) already met every rank on this store:
        # build the group on it rather than start a second server on MASTER_PORT.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=layout["rank"],
                                world_size=layout["world_size"], timeout=timedelta(seconds=timeout_s))
    # With a group already there, DeepSpeed only wraps it (its communication backend).
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False)
    if dist.get_backend() == "gloo":
        _CONTROL_GROUP = None  # the default group already runs on the host
    else:
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=layout["rank"], world_size=layout["world_size"], local_rank=layout["local_rank"],
                   device=device, launcher=layout["launcher"])


def is_initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist
        dist.barrier(group=_CONTROL_GROUP)


def max_over_ranks(values: list[int]) -> list[int]:
    """Element-wise MAX of small integers over ranks, on the host (the step-control vote, control.py)."""
    if not is_initialized():
        return [int(v) for v in values]
    import torch.distributed as dist
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return [int(v) for v in t.tolist()]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (small Python objects: loader and RNG states)."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL_GROUP)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def reduce_stats(sums: list[float], maxes: list[float], device: torch.device) -> tuple[list[float], list[float]]:
    """Sum of `sums` and max of `maxes` over ranks (one collective each; used only at log steps)."""
    if not is_initialized():
        return list(sums), list(maxes)
    import torch.distributed as dist
    s = torch.tensor(sums, dtype=torch.float64, device=device)
    m = torch.tensor(maxes, dtype=torch.float64, device=device)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return s.tolist(), m.tolist()


def shutdown() -> None:
    global _CONTROL_GROUP
    if is_initialized():
        import torch.distributed as dist
        dist.destroy_process_group()
    _CONTROL_GROUP = None


# ---------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Bit-exact reruns (kill-and-resume reproduces the trajectory) at some speed cost."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
