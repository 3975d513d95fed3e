"""Helpers for the multi-process pretraining tests: start launch/pretrain.py under a launcher, wait
for progress in the run's metrics, read trajectories. Shared by test_train_*.py and test_mlflow_server.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "pretrain.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(run_dir: Path, shards: Path, **extra) -> list[str]:
    """Tiny, deterministic fp32 runs that log every step (the trajectories are compared exactly)."""
    values = {"train.run_dir": str(run_dir), "data.shards": str(shards), "train.precision": "fp32",
              "train.deterministic": "true", "train.log_every": "1", "train.micro_batch": "4",
              "train.image_every": "1000", "train.keep_last": "2", "tracking.enabled": "false",
              "data.num_threads": "1", "optim.warmup_steps": "2"}
    values.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def command(launcher: str, overrides: list[str], nproc: int = 2) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    if launcher == "deepspeed":
        # --num_gpus N: without it the launcher starts ONE process on a CPU-only machine.
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                str(LAUNCH), "--config", "tiny_cpu", *sets]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), str(LAUNCH),
                "--config", "tiny_cpu", *sets]
    if launcher == "echocare":
        return [str(BIN / "echocare"), "pretrain", "--nproc", str(nproc), "--config", "tiny_cpu", *sets]
    if launcher == "python":
        return [sys.executable, str(LAUNCH), "--config", "tiny_cpu", *sets]
    raise ValueError(launcher)


def env() -> dict:
    e = dict(os.environ)
    # Same thread count under every launcher (torchrun would set 1, deepspeed would not): matmul
    # reduction order, hence bit-exact trajectories, depends on it. Also kind to a 2-core CI box.
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def start(launcher: str, overrides: list[str], log_path: Path, nproc: int = 2, extra_env: dict | None = None):
    fh = open(log_path, "ab")
    e = env()
    e.update(extra_env or {})
    # Own session: a test can SIGKILL the launcher and every rank at once.
    return subprocess.Popen(command(launcher, overrides, nproc), cwd=REPO, env=e, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(launcher: str, overrides: list[str], log_path: Path, nproc: int = 2, timeout: float = 420,
        extra_env: dict | None = None) -> int:
    proc = start(launcher, overrides, log_path, nproc, extra_env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{launcher} run timed out; log:\n{tail(log_path)}")


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def wait_for_step(run_dir: Path, step: int, proc, log_path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}; log:\n{tail(log_path)}")
        time.sleep(0.3)
    raise AssertionError(f"no step {step} within {timeout} s; log:\n{tail(log_path)}")


def latest(run_dir: Path) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def rank_pids(proc) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher (ranks read from the env).

    A rank's own children (data-loader workers) carry the same RANK and command line: the rank
    is the process whose parent is not a rank."""
    import psutil
    candidates = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            rank = child.environ().get("RANK")
            if rank is not None and (str(LAUNCH) in cmd or "echocare_dist.train.cli" in cmd):
                candidates[child.pid] = (int(rank), child.ppid())
        except psutil.Error:
            continue
    return {rank: pid for pid, (rank, ppid) in candidates.items() if ppid not in candidates}
