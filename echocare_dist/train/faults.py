"""A failing rank ends the whole job within seconds, and the one place faults are injected for tests.

Why: a rank that raises leaves its peers inside a collective (the gradient reduction, the
step-control vote) that only `train.dist_timeout_s` (30 min) would end; with NCCL even a dead
peer is not noticed before that. So:

- The failing rank writes a report, `{run_dir}/.faults/<attempt>/rank-<r>.json` (host, pid, error,
  traceback tail), stops its loader workers and exits non-zero (pretrain()'s finally).
- Every rank runs a `PeerWatchdog` thread that polls that folder each second. On a peer's report
  it logs the peer's error, raises the failure flag of the step-control vote (control.py: a rank
  that still reaches the vote leaves cleanly with `PeerFailed`) and, if the main thread has not
  left within `grace_s` (it is blocked in a collective with the dead rank), kills this rank's
  loader workers and ends the process with exit code 1 (`os._exit`: Python's exit handler would
  join workers that ignore SIGTERM forever).
- A rank whose own collective fails because the peer left (gloo reports the closed connection)
  names the peer's error instead of its own: `PeerFailed`.
`<attempt>` is a token rank 0 broadcasts at start, so reports of an earlier attempt (a requeue)
never stop a new one; rank 0 removes the older attempts' folders (the run-directory lock makes it
the only run there). A rank killed without a trace (SIGKILL, the OOM killer) writes no report:
the launcher sees that exit and stops the others (torchrun, deepspeed, `echocare pretrain --nproc`,
`srun --kill-on-bad-exit`).

Fault injection, for the fault tests only: $ECHOCARE_FAULT, read here and nowhere else.

    raise@step:3:rank:1     rank 1 raises InjectedFault before computing step 3
    nan@step:3:rank:1       rank 1's loss is NaN at step 3 (the step is skipped, training goes on)
    nan@step:3-5            every rank's loss is NaN at steps 3..5
    nan@step:3+             ... from step 3 on (the run stops after train.max_bad_steps)

Steps count from 1 (the step being computed); without `:rank:R` every rank is affected.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_json

log = logging.getLogger(__name__)

FAULT_ENV = "ECHOCARE_FAULT"
FAULTS_DIR = ".faults"
EXIT_PEER_FAILED = 1       # a crash, like the failing rank's own exit
_FAULT_RE = re.compile(r"^(raise|nan)@step:(\d+)(\+|-\d+)?(?::rank:(\d+))?$")


class InjectedFault(RuntimeError):
    """Raised by a rank on $ECHOCARE_FAULT=raise@...: a stand-in for any exception in a rank."""


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops too. The message carries the peer's error."""


@dataclass(frozen=True)
class Fault:
    kind: str                  # "raise" | "nan"
    first: int
    last: int | None           # inclusive; None = no end
    rank: int | None           # None = every rank

    def applies(self, kind: str, step: int, rank: int) -> bool:
        return (self.kind == kind and (self.rank is None or self.rank == rank) and step >= self.first
                and (self.last is None or step <= self.last))


def parse_fault(text: str) -> Fault | None:
    text = text.strip()
    if not text:
        return None
    m = _FAULT_RE.match(text)
    if not m:
        raise ValueError(f"${FAULT_ENV}={text!r}: expected KIND@step:N[+|-M][:rank:R] with KIND raise or nan "
                         f"(e.g. raise@step:3:rank:1)")
    kind, first, tail, rank = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    last = first if tail is None else (None if tail == "+" else int(tail[1:]))
    if last is not None and last < first:
        raise ValueError(f"${FAULT_ENV}={text!r}: the last step {last} is before the first {first}")
    return Fault(kind, first, last, None if rank is None else int(rank))


class FaultPlan:
    """The injected faults of this process (none unless $ECHOCARE_FAULT is set)."""

    def __init__(self, fault: Fault | None, rank: int):
        self.fault, self.rank = fault, rank
        if fault is not None:
            log.warning("fault injection active on rank %d: %s=%s", rank, FAULT_ENV, os.environ.get(FAULT_ENV))

    @classmethod
    def from_env(cls, rank: int, environ=None) -> "FaultPlan":
        environ = os.environ if environ is None else environ
        return cls(parse_fault(environ.get(FAULT_ENV, "")), rank)

    def before_step(self, step: int) -> None:
        if self.fault is not None and self.fault.applies("raise", step, self.rank):
            raise InjectedFault(f"injected fault ({FAULT_ENV}): rank {self.rank} raises at step {step}")

    def nan_loss(self, step: int) -> bool:
        return self.fault is not None and self.fault.applies("nan", step, self.rank)


# ---------------------------------------------------------------------------------- reports
class FailureBoard:
    """The failure reports of one attempt of the run, a folder every rank can read."""

    def __init__(self, run_dir: Path, attempt: str, rank: int):
        self.root = Path(run_dir) / FAULTS_DIR
        self.dir = self.root / attempt
        self.rank = rank

    @staticmethod
    def new_attempt() -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]

    def prepare(self, is_main: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            for old in self.root.iterdir():
                if old.is_dir() and old.name != self.dir.name:
                    shutil.rmtree(old, ignore_errors=True)

    def report(self, exc: BaseException) -> None:
        """Best effort: a failure while reporting a failure must not hide the first one."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / f"rank-{self.rank}.json", {
                "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-4000:]})
        except Exception as report_exc:  # noqa: BLE001 - e.g. the disk that is full
            log.error("could not write the failure report under %s: %s", self.dir, report_exc)

    def peer_failures(self) -> list[dict]:
        """Reports of the other ranks, earliest first."""
        out = []
        try:
            entries = list(self.dir.glob("rank-*.json"))
        except OSError:
            return []
        for path in entries:
            if path.name == f"rank-{self.rank}.json":
                continue
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being written (atomic rename) or unreadable: the next poll sees it
        return sorted(out, key=lambda r: r.get("time", 0))


def describe_failure(report: dict) -> str:
    return f"rank {report.get('rank')} (pid {report.get('pid')} on {report.get('host')}) failed: {report.get('error')}"


def kill_worker_processes() -> None:
    """SIGKILL this process's multiprocessing children (the loader's workers): they ignore SIGTERM,
    and a process leaving with os._exit would otherwise leave them to notice our death themselves."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    for child in multiprocessing.active_children():
        child.join(timeout=2)


class PeerWatchdog(threading.Thread):
    """Polls the failure board; see the module docstring for what it does on a peer's report."""

    def __init__(self, board: FailureBoard, on_failure, *, poll_s: float = 1.0, grace_s: float = 10.0):
        super().__init__(name="echocare-peer-watchdog", daemon=True)
        self.board, self.on_failure = board, on_failure
        self.poll_s, self.grace_s = poll_s, grace_s
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()

    def run(self) -> None:
        while not self._done.wait(self.poll_s):
            reports = self.board.peer_failures()
            if reports:
                break
        else:
            return
        first = reports[0]
        log.error("stopping rank %d: %s", self.board.rank, describe_failure(first))
        self.on_failure(first)
        if self._done.wait(self.grace_s):
            return  # the main thread left on its own (vote or failed collective)
        log.error("rank %d is still blocked %.0f s after the peer's failure (a collective with the failed rank): "
                  "exiting with code %d", self.board.rank, self.grace_s, EXIT_PEER_FAILED)
        kill_worker_processes()
        for handler in logging.getLogger("echocare_dist").handlers:
            handler.flush()
        os._exit(EXIT_PEER_FAILED)
