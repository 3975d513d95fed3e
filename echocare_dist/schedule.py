"""The learning-rate schedule of pretraining and fine-tuning: linear warmup, then cosine (SPEC 3).

A pure function of the step, so a resumed run (or another world size, or a longer run) asks it
again for any step and gets the LR the schedule defines there, with no state to restore.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def warmup_cosine(step: int, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                  schedule: str = "cosine") -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `peak_lr` over `warmup_steps`, then
    cosine to `min_lr` at `total_steps` and flat after it; "constant" holds the peak after warmup."""
    if schedule not in SCHEDULES:
        raise ValueError(f"LR schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        # (step+1): the first update already moves; the peak is reached on the last warmup step.
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
