"""The step-control vote: ONE small host-side all-reduce that carries every "stop now" flag.

Every `train.preempt_check_every` steps (and at the first step of each attempt, so a signal that
arrived during the slow setup is acted on at once) the ranks MAX-reduce three integers over the
gloo control group (distributed.max_over_ranks; no GPU synchronisation):

    preempt  this rank received a preemption signal     -> all checkpoint, exit train.requeue_exit_code
    failed   this rank's watchdog saw a peer's failure   -> all raise PeerFailed (faults.py), exit 1
    bad      this rank's count of consecutive skipped non-finite steps
                                                         -> NonFiniteError at train.max_bad_steps, exit 3

Non-finite steps are decided EVERY step, without a collective of ours: the step's global gradient
norm is all-reduced by DeepSpeed already (ZeRO partitions included) and a NaN/Inf loss on any rank
is turned into NaN gradients before the reduction (step.py), so every rank sees the same norm and
skips the same steps (DeepSpeed's overflow skip, or nonfinite.py's guard where DeepSpeed has none).
The consecutive count is therefore identical on every rank and the run stops at the same step
everywhere; the vote carries it too, as a cross-check that no rank trains on alone.

Cadence (default 10). Slurm signals 600 s before the time limit (slurm/pretrain.sh) and checks
about every 30 s; a Swin-L step takes well under 3 s on a GPU node, so 10 steps delay the
preemption checkpoint by under 30 s and the checkpoint (tens of seconds for Swin-L ZeRO-2) still
ends far inside the lead, while 90 % of the per-step vote's host round trips are gone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import distributed
from .faults import PeerFailed, describe_failure

log = logging.getLogger(__name__)

EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """train.max_bad_steps consecutive steps had a NaN/Inf loss or gradient norm (exit code 3)."""


@dataclass
class Decision:
    preempt: bool = False       # checkpoint and exit with the requeue code


class StepControl:
    def __init__(self, every: int, max_bad_steps: int, preempt, first_step: int):
        self.every, self.max_bad_steps = every, max_bad_steps
        self.preempt = preempt                # preemption.PreemptionHandler
        self.first_step = first_step          # the attempt's first step (after a resume)
        self.bad_streak = 0
        self.bad_total = 0
        self.peer_failure: dict | None = None  # set by faults.PeerWatchdog (another thread)

    def record(self, step: int, bad: bool, detail: str) -> None:
        """After each step: count it; raise NonFiniteError at the limit (the same step on every rank)."""
        if not bad:
            self.bad_streak = 0
            return
        self.bad_streak += 1
        self.bad_total += 1
        log.warning("step %d skipped: non-finite %s (%d in a row, limit train.max_bad_steps=%d)",
                    step, detail, self.bad_streak, self.max_bad_steps)
        if self.bad_streak >= self.max_bad_steps:
            raise NonFiniteError(self._message(step))

    def _message(self, step: int) -> str:
        return (f"{self.bad_streak} consecutive non-finite steps (NaN/Inf loss or gradient norm) up to step {step} "
                f"(train.max_bad_steps={self.max_bad_steps}): stopping without a new checkpoint; `latest` "
                f"stays on the last finite one. Lower optim.lr, check the data, or try train.precision=fp32")

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.first_step

    def vote(self, step: int) -> Decision:
        """Collective when due (every rank calls it after every step)."""
        if not self.due(step):
            return Decision()
        preempt, failed, bad = distributed.max_over_ranks(
            [int(self.preempt.requested_locally), int(self.peer_failure is not None), self.bad_streak])
        if failed:
            detail = describe_failure(self.peer_failure) if self.peer_failure else "a peer rank failed"
            raise PeerFailed(f"stopping at step {step}: {detail}")
        if bad >= self.max_bad_steps:
            self.bad_streak = bad
            raise NonFiniteError(self._message(step))
        if preempt and self.preempt.requested_by is None:
            self.preempt.requested_by = "peer rank"
        return Decision(preempt=bool(preempt))

    @property
    def checkpoint_safe(self) -> bool:
        """A checkpoint now would hold finite weights: the last step was applied, not skipped."""
        return self.bad_streak == 0
