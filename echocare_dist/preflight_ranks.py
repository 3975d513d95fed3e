"""Pre-flight across ranks and hosts: the rendezvous address and port, one world size, one report.

On several nodes each rank runs the pre-flight for itself (its host's mounts, its environment).
Alone, a rank that finds a problem would exit while the others wait in the rendezvous until
train.dist_timeout_s, and the message would be in one node's log only. So, before any process
group exists:

1. `rendezvous_problems` (a pre-flight check, every rank): the rendezvous address resolves from
   this host, the port is a port, the launcher's variables agree (WORLD_SIZE vs the tasks Slurm
   started).
2. `roll_call` (run_preflight, after the checks, when the world has more than one rank): rank 0
   serves a torch TCPStore on MASTER_ADDR:MASTER_PORT (a port already in use is reported here,
   naming the host); every rank posts its host, world size and problems; rank 0 compares the
   world sizes and posts one verdict; every rank reads it. Any problem on any rank stops every
   rank with exit code 2 and the same list, each entry naming the rank and host. A rank that does
   not come within the timeout is named too.
   A clean verdict leaves the store connected; it is handed to the process group
   (launch_env.hand_over_store), which thus meets on the same server.

Problems travel as (key, value, reason) triples; preflight.py turns them into `Problem`s.
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from typing import Mapping

from . import launch_env

KEY_PREFIX = "echocare/preflight"
POLL_S = 0.1
# How long rank 0 keeps a failing verdict served so that every rank can read it.
VERDICT_LINGER_S = 10.0


def _host() -> str:
    return socket.gethostname()


def layout_or_problem(environ: Mapping[str, str]) -> tuple[dict | None, tuple | None]:
    try:
        return launch_env.detect_env(dict(environ)), None
    except (ValueError, RuntimeError) as exc:
        keys = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
        shown = " ".join(f"{k}={environ[k]}" for k in keys if k in environ)
        return None, ("launcher environment", shown or "(none)", f"{exc} (on host {_host()})")


def rendezvous_problems(environ: Mapping[str, str]) -> list[tuple]:
    """This rank's own view of the rendezvous: (key, value, reason) triples, [] when fine."""
    layout, problem = layout_or_problem(environ)
    if problem:
        return [problem]
    if layout["world_size"] == 1:
        return []
    host, problems = _host(), []
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    # Under srun (slurm/pretrain.sh exports RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS), one task
    # is one rank; torchrun under srun has ranks of its own and is left alone.
    if (tasks.isdigit() and "TORCHELASTIC_RUN_ID" not in environ
            and environ.get("RANK") == environ.get("SLURM_PROCID") and int(tasks) != layout["world_size"]):
        problems.append(("WORLD_SIZE", layout["world_size"],
                         f"rank {layout['rank']} on host {host}: Slurm started {tasks} tasks in this step "
                         f"(SLURM_STEP_NUM_TASKS) but WORLD_SIZE says {layout['world_size']}: the ranks "
                         f"would wait for each other until train.dist_timeout_s"))
    port = str(layout["master_port"])
    if not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(("MASTER_PORT", port, "not a TCP port (1-65535)"))
        return problems
    addr = layout["master_addr"]
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        problems.append((layout["addr_source"], environ.get(layout["addr_source"], addr),
                         f"the rendezvous host {addr!r} cannot be resolved on host {host} ({reason})"))
    return problems


def _reachable(layout: dict) -> bool:
    port = str(layout["master_port"])
    if not port.isdigit() or not 0 < int(port) < 65536:
        return False
    try:
        socket.getaddrinfo(layout["master_addr"], int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _attempt_id(environ: Mapping[str, str]) -> str:
    """Keys of one start: a torchelastic agent's store outlives restarts, ours does not."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return f"{environ['TORCHELASTIC_RUN_ID']}.{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return ".".join(environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID"))


def _open_store(layout: dict, environ: Mapping[str, str], timeout_s: float):
    """(store, None) or (None, problem)."""
    from torch.distributed import TCPStore
    addr, port, rank = layout["master_addr"], int(layout["master_port"]), layout["rank"]
    # torchrun's agent already serves a store on MASTER_PORT: every rank is its client.
    serve = rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    try:
        store = TCPStore(addr, port, None, serve, timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError, TimeoutError
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if serve and ("in use" in text.lower() or "errno: 98" in text.lower()):
            return None, ("MASTER_PORT", port, f"port {port} is already in use on host {_host()} (rank 0 "
                          f"serves the rendezvous there): another job or process holds it; pick another "
                          f"with ECHOCARE_MASTER_PORT / MASTER_PORT")
        if serve:
            return None, ("MASTER_PORT", port, f"rank 0 cannot serve the rendezvous on host {_host()} "
                          f"port {port}: {text}")
        return None, (layout["addr_source"], addr, f"rank {rank} on host {_host()} cannot reach the rendezvous "
                      f"at {addr}:{port} within {timeout_s:g} s: {text}")
    return store, None


def roll_call(environ: Mapping[str, str], problems: list[tuple], timeout_s: float) -> list[tuple]:
    """Every rank's problems (triples whose reason names rank and host), [] when all are fine.
    A world of one returns `problems` unchanged. On [] the connected store is handed over."""
    layout, _ = layout_or_problem(environ)
    if layout is None or layout["world_size"] == 1:
        return problems
    if not _reachable(layout):
        return problems  # no rendezvous possible (reported by rendezvous_problems); srun ends the others
    store, problem = _open_store(layout, environ, timeout_s)
    if store is None:
        return problems + [problem]
    rank, world, host = layout["rank"], layout["world_size"], _host()
    prefix = f"{KEY_PREFIX}/{_attempt_id(environ)}"
    entry = dict(rank=rank, host=host, pid=os.getpid(), world_size=world, problems=[list(p) for p in problems])
    store.set(f"{prefix}/rank/{rank}", json.dumps(entry, default=str))
    if rank == 0:
        verdict = _collect(store, prefix, layout, entry, timeout_s)
        store.set(f"{prefix}/verdict", json.dumps(verdict, default=str))
        if verdict:
            _linger(store, prefix, world)
    else:
        verdict = _await_verdict(store, prefix, layout, timeout_s)
        store.set(f"{prefix}/read/{rank}", "1")
    if verdict:
        return [tuple(p) for p in verdict]
    launch_env.hand_over_store(store)
    return []


def _collect(store, prefix: str, layout: dict, own: dict, timeout_s: float) -> list[list]:
    """Rank 0: wait for every rank's entry, compare world sizes; the verdict (problem triples)."""
    world = layout["world_size"]
    entries: dict[int, dict] = {0: own}
    deadline = time.monotonic() + timeout_s
    verdict: list[list] = []
    while len(entries) < world and time.monotonic() < deadline:
        for r in range(world):
            if r not in entries and store.check([f"{prefix}/rank/{r}"]):
                entries[r] = json.loads(store.get(f"{prefix}/rank/{r}"))
        # A rank beyond our world announces itself too: a mismatch, even if all of ours came.
        if store.check([f"{prefix}/rank/{world}"]):
            extra = json.loads(store.get(f"{prefix}/rank/{world}"))
            verdict.append(["WORLD_SIZE", extra["world_size"], f"rank {world} on host {extra['host']} joined "
                            f"but rank 0 on host {own['host']} has WORLD_SIZE={world}"])
            break
        if any(e["world_size"] != world for e in entries.values()):
            break
        if len(entries) < world:
            time.sleep(POLL_S)
    zero = own
    for r, e in sorted(entries.items()):
        if e["world_size"] != world:
            verdict.append(["WORLD_SIZE", e["world_size"], f"rank {r} on host {e['host']} has "
                            f"WORLD_SIZE={e['world_size']} but rank 0 on host {zero['host']} has {world}: "
                            f"every rank must be started with the same world size"])
    # The same problem on several ranks (one host's mount seen by its 8 ranks) is one line.
    where: dict[tuple, list[tuple[int, str]]] = {}
    for r, e in sorted(entries.items()):
        for key, value, reason in e["problems"]:
            where.setdefault((key, str(value), reason), []).append((r, e["host"]))
    for (key, value, reason), ranks in where.items():
        verdict.append([key, value, reason if len(ranks) == 1 and f"on host {ranks[0][1]}" in reason
                        else f"{reason} [{_describe_ranks(ranks)}]"])
    missing = [r for r in range(world) if r not in entries]
    if missing and not any(p[0] == "WORLD_SIZE" for p in verdict):
        verdict.append(["train.dist_timeout_s", f"{timeout_s:g}", f"rank(s) {missing} of {world} did not reach the "
                        f"pre-flight within {timeout_s:g} s (rank 0 on host {zero['host']} serves "
                        f"{layout['master_addr']}:{layout['master_port']})"])
    return verdict


def _describe_ranks(ranks: list[tuple[int, str]]) -> str:
    """'rank 1 on host node2', 'ranks 0, 1 on host node1; rank 2 on host node2'."""
    by_host: dict[str, list[int]] = {}
    for rank, host in ranks:
        by_host.setdefault(host, []).append(rank)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on host {host}"
                     for host, rs in by_host.items())


def _await_verdict(store, prefix: str, layout: dict, timeout_s: float) -> list[list]:
    key = f"{prefix}/verdict"
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the store's timeout error type varies across torch versions
        return [[layout["addr_source"], layout["master_addr"], f"rank {layout['rank']} on host {_host()}: no "
                 f"pre-flight verdict from rank 0 at {layout['master_addr']}:{layout['master_port']} within "
                 f"{timeout_s:g} s ({type(exc).__name__})"]]
    return json.loads(store.get(key))


def _linger(store, prefix: str, world: int) -> None:
    """Rank 0 with a failing verdict: serve it until every rank has read it (bounded)."""
    came = [r for r in range(1, world + 1) if store.check([f"{prefix}/rank/{r}"])]  # the others never will
    deadline = time.monotonic() + VERDICT_LINGER_S
    while time.monotonic() < deadline:
        if all(store.check([f"{prefix}/read/{r}"]) for r in came):
            return
        time.sleep(POLL_S)
