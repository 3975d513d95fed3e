"""The rank layout a launcher gives a process, read from its environment, without torch.

The DeepSpeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `srun` (one task per GPU) exports SLURM_PROCID / SLURM_STEP_NUM_TASKS /
SLURM_LOCALID, which we translate; a plain `python` start with none of them is a world of one.
Both the pre-flight (preflight_ranks.py, before any process group) and the process-group setup
(train/distributed.py) read the layout here, so they always agree on it.

The pre-flight's cross-rank exchange ends with a connected rendezvous store (rank 0 serving it on
MASTER_PORT); it is handed over here (`hand_over_store` / `take_store`) so the process group is
built on that same store instead of a second server on the same port.
"""
from __future__ import annotations

import os
import re
import socket

# Who set the rendezvous address: shown in errors, so the user knows which setting to fix.
ADDR_SOURCE_DIRECT = "MASTER_ADDR"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as 'gpu[03-05,09],cpu1' (what scontrol would print)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_env(environ: dict | None = None) -> dict:
    """Rank layout from the launcher's environment; fills MASTER_ADDR/PORT where a launcher does not.
    Also says where the address came from (`addr_source`: MASTER_ADDR or the Slurm nodelist variable)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        layout = dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                      local_rank=int(env.get("LOCAL_RANK", 0)), launcher="deepspeed/torchrun",
                      master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=env.get("MASTER_PORT", "29500"),
                      addr_source=ADDR_SOURCE_DIRECT)
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        # Only srun sets SLURM_STEP_NUM_TASKS: a batch script alone (one process) stays single.
        source = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(k)), "")
        nodelist = env.get(source, "") or "127.0.0.1"
        # A job-derived port lets two jobs share a node without colliding.
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        layout = dict(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_STEP_NUM_TASKS"]),
                      local_rank=int(env.get("SLURM_LOCALID", 0)), launcher="slurm",
                      master_addr=addr, master_port=port,
                      addr_source=ADDR_SOURCE_DIRECT if env.get("MASTER_ADDR") else (source or "MASTER_ADDR"))
    else:
        layout = dict(rank=0, world_size=1, local_rank=0, launcher="single",
                      master_addr="127.0.0.1", master_port=env.get("MASTER_PORT") or str(free_port()),
                      addr_source=ADDR_SOURCE_DIRECT)
    if not 0 <= layout["rank"] < layout["world_size"]:
        raise RuntimeError(f"inconsistent launcher environment: rank {layout['rank']} of world "
                           f"size {layout['world_size']}")
    return layout


_STORE = None


def hand_over_store(store) -> None:
    """Keep the pre-flight's rendezvous store (a torch TCPStore) for the process group."""
    global _STORE
    _STORE = store


def take_store():
    """The store handed over by the pre-flight (then forgotten here), or None."""
    global _STORE
    store, _STORE = _STORE, None
    return store
