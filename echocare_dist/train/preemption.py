"""Graceful preemption: a signal sets a flag, the ranks agree at the step-control vote.

Slurm (`--signal=B:USR1@N`, or SIGTERM before a kill / scancel / preemption) may deliver the
signal to one rank, to all, or at slightly different steps. Acting inside the handler would
deadlock collectives, so the handler only records the signal; every train.preempt_check_every
steps the ranks vote (control.py, one host-side MAX all-reduce) and, when any rank was signalled,
all of them write a checkpoint and the process exits with `train.requeue_exit_code` (default
124), which the Slurm script turns into a requeue. Exit 0 means the run finished.

One exception: inside `interruptible()` (the MLflow start, which may block in network retries for
minutes) the signal raises `Preempted` at once instead; the trainer then leaves with the requeue
code without a new checkpoint (no step has run in this attempt, so there is nothing to save).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterable


class Preempted(BaseException):
    """A preemption signal arrived inside `interruptible()`. A BaseException, like KeyboardInterrupt:
    client libraries (MLflow wraps every request error) must not turn it into their own error."""


class PreemptionHandler:
    def __init__(self, signal_names: Iterable[str]):
        self.requested_by: str | None = None
        self._interruptible = False
        self._previous = {}
        for name in signal_names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Async-signal context: only record. A second signal while saving is ignored on purpose;
        # the checkpoint in flight is what makes the requeue cheap.
        first = self.requested_by is None
        if first:
            self.requested_by = signal.Signals(signum).name
        if self._interruptible and first:
            raise Preempted(self.requested_by)

    @property
    def requested_locally(self) -> bool:
        return self.requested_by is not None

    @contextlib.contextmanager
    def interruptible(self):
        """A signal inside (or already received before) the block raises Preempted."""
        if self.requested_by is not None:
            raise Preempted(self.requested_by)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
