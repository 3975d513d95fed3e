"""The local launcher behind `echocare pretrain --nproc N`: N ranks on this machine, owned by it.

torchrun (which this replaced) starts its workers in their own sessions and handles only some
signals: a SIGKILLed launcher left both ranks training, SIGUSR1 killed the launcher alone, and a
SIGTERM gave exit 1 with a traceback after 30 s instead of the ranks' checkpoint and 124. Here:

- The ranks are plain child processes (`python -m echocare_dist.train.cli`, RANK / WORLD_SIZE /
  LOCAL_RANK / MASTER_ADDR / MASTER_PORT in their environment), all in ONE new process group
  that also holds their loader workers, each with PR_SET_PDEATHSIG = SIGKILL: if the launcher
  dies, even by SIGKILL, the kernel kills the ranks, whose workers then see their parent go.
- The preemption signals (train.preempt_signals: SIGTERM, SIGUSR1) are forwarded to every rank;
  they checkpoint and exit with train.requeue_exit_code, and so does the launcher (no traceback).
  SIGINT (Ctrl-C; the ranks' own group does not get the terminal's) is forwarded as SIGTERM: a
  checkpoint, then the requeue code. A second SIGINT kills the group at once.
- A rank that fails: the others stop by themselves within seconds (faults.py); whatever is still
  alive `grace_s` later is SIGKILLed. The launcher returns the first failing rank's exit code.
- The run directory lock (runlock.py) is held for the launcher's whole life; the ranks see it
  held by their parent and run under it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..runlock import RunDirLock

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(launcher_pid: int, pgid_box: list[int]):
    """preexec_fn (runs in the child between fork and exec; the launcher has no threads)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        os.setpgid(0, pgid_box[0] if pgid_box else 0)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)  # no parent-death signal: refuse to run a rank that could be orphaned
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os._exit(126)
    return setup


def rank_env(rank: int, nproc: int, port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    return env


class LocalLauncher:
    def __init__(self, worker_argv: list[str], nproc: int, run_dir: Path, *, requeue_code: int,
                 forward_signals: tuple[str, ...], grace_s: float = 60.0):
        self.worker_argv, self.nproc, self.run_dir = worker_argv, nproc, Path(run_dir)
        self.requeue_code, self.grace_s = requeue_code, grace_s
        self.forward = tuple(signal.Signals[name] for name in forward_signals)
        self.procs: list[subprocess.Popen] = []
        self.pgid: int | None = None
        self._interrupts = 0

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self._kill_group()
                return
            sig = signal.SIGTERM
        print(f"echocare pretrain: {signal.Signals(signum).name} received: forwarding {sig.name} to "
              f"{self.nproc} ranks (they checkpoint and exit)", file=sys.stderr, flush=True)
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _kill_group(self) -> None:
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        lock = RunDirLock(self.run_dir).acquire()  # RunDirLocked: exit 2 through the CLI
        handled = set(self.forward) | {signal.SIGINT}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            self._start()
            return self._wait()
        finally:
            self._kill_group()  # leftovers: a worker of a rank that left with os._exit
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()

    def _start(self) -> None:
        port = _free_port()
        pgid_box: list[int] = []
        cmd = [sys.executable, "-m", "echocare_dist.train.cli", *self.worker_argv]
        for rank in range(self.nproc):
            p = subprocess.Popen(cmd, env=rank_env(rank, self.nproc, port),
                                 preexec_fn=_child_setup(os.getpid(), pgid_box))
            if not pgid_box:
                pgid_box.append(p.pid)
                self.pgid = p.pid
            self.procs.append(p)

    def _wait(self) -> int:
        codes: dict[int, int] = {}
        first_failure: int | None = None
        kill_at = None
        while len(codes) < self.nproc:
            for rank, p in enumerate(self.procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode not in (0, self.requeue_code) and first_failure is None:
                        first_failure = rank
                        kill_at = time.monotonic() + self.grace_s
            if kill_at is not None and time.monotonic() > kill_at and len(codes) < self.nproc:
                alive = [r for r in range(self.nproc) if r not in codes]
                print(f"echocare pretrain: rank {first_failure} failed (exit {codes[first_failure]}); ranks "
                      f"{alive} still running {self.grace_s:.0f} s later: killing them", file=sys.stderr, flush=True)
                self._kill_group()
                kill_at = None
            time.sleep(POLL_S)
        return self._exit_code(codes, first_failure)

    def _exit_code(self, codes: dict[int, int], first_failure: int | None) -> int:
        if first_failure is not None:
            code = codes[first_failure]
            return code if code > 0 else 128 + (-code)  # killed by signal N: the shell's 128+N
        if any(c == self.requeue_code for c in codes.values()):
            return self.requeue_code
        return 0
