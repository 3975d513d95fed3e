"""Helpers shared by the Slurm tests (tests/test_slurm.py: one node; tests/test_slurm_multinode.py:
several nodes in network namespaces): the cluster handle, job environment, log and checkpoint reads."""
from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    state: Path
    env: dict

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def job(self, job_id: str) -> dict:
        """Fields of `scontrol show job` (no accounting here: sacct has nothing)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, predicate, what: str, timeout: float, log: Path) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id}: {what} not reached in {timeout:.0f}s: {info}\n{tail(log)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f}\n{tail(f)}" for f in sorted((self.state / "log").glob("*.log")))


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd): a stale cluster elsewhere cannot clash."""
    for _ in range(100):
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def job_env() -> dict:
    # Jobs inherit the submitter's environment (--export=ALL): no Slurm or rank variables from an
    # outer job, the venv that runs these tests, the shared DeepSpeed extension cache (conftest).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}/usr/sbin{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["ECHOCARE_VENV"] = sys.prefix
    env["ECHOCARE_PYTHON"] = sys.executable
    return env


def latest(run_dir: Path) -> str:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else ""


def step_of(tag: str) -> int:
    m = re.fullmatch(r"step_(\d{8})", tag)
    assert m, f"checkpoints/latest holds {tag!r}, not step_XXXXXXXX"
    return int(m.group(1))
