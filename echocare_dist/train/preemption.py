"""Graceful preemption: a signal sets a flag, the ranks agree at the next step boundary.

Slurm (`--signal=B:USR1@N`, or SIGTERM before a kill / scancel / preemption) may deliver the
signal to one rank, to all, or at slightly different steps. Acting inside the handler would
deadlock collectives, so the handler only records the signal; at every step boundary the
ranks vote (host-side MAX all-reduce) and, when any rank was signalled, all of them write a
checkpoint and the process exits with `train.requeue_exit_code` (default 124), which the Slurm
script turns into a requeue. Exit 0 means the run finished; anything else is a crash.
"""
from __future__ import annotations

import signal
from typing import Iterable

from . import distributed


class PreemptionHandler:
    def __init__(self, signal_names: Iterable[str]):
        self.requested_by: str | None = None
        self._previous = {}
        for name in signal_names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Async-signal context: only record. A second signal while saving is ignored on purpose;
        # the checkpoint in flight is what makes the requeue cheap.
        if self.requested_by is None:
            self.requested_by = signal.Signals(signum).name

    @property
    def requested_locally(self) -> bool:
        return self.requested_by is not None

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has been signalled."""
        stop = distributed.any_rank(self.requested_locally)
        if stop and self.requested_by is None:
            self.requested_by = "peer rank"
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
