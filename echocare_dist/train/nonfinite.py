"""Steps with a NaN/Inf loss or gradient norm are skipped, never applied (control.py counts them).

Two pieces make the skip the same on every rank:
- `poison_scale(loss)`: the loss is multiplied by 1.0 when finite (bit-identical gradients) and by
  NaN when not, so a non-finite loss on ONE rank makes that rank's gradients NaN, and the gradient
  reduction spreads it into the global norm every rank computes.
- Whoever runs the optimizer checks that global norm before the update. DeepSpeed does for ZeRO
  1-3 (fp32, fp16, and bf16 with `bf16.check_grad_overflow`, on by default) and its bf16/fp16
  optimizers: the update is skipped, `engine.skipped_steps` grows, the LR schedule does not move.
  A plain (ZeRO-0, fp32) client optimizer gets `install_guard`, which does the same.
`step_skipped` then tells the trainer whether the step it just ran was applied.

fp16: DeepSpeed's loss scaler skips overflowing steps by design while it lowers the scale; those
count as bad only once the scale is at its minimum (then the scaler cannot help any more).
"""
from __future__ import annotations

import math

import torch


def poison_scale(loss: torch.Tensor) -> torch.Tensor:
    """1.0 for a finite loss, NaN otherwise; detached, computed on the device (no synchronisation)."""
    finite = torch.isfinite(loss.detach())
    return torch.where(finite, torch.ones_like(loss.detach()), torch.full_like(loss.detach(), math.nan))


def _grad_norm(optimizer) -> float:
    grads = [p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0).float() for g in grads]), 2.0))


def install_guard(optimizer) -> bool:
    """Skip-on-non-finite for an optimizer DeepSpeed calls directly (ZeRO-0 fp32: no overflow check).

    Its gradients are the full, already all-reduced ones, so the norm is the same on every rank.
    Sets the two attributes the DeepSpeed engine reads after a step: `overflow` (skip: no LR step,
    skipped_steps += 1) and `_global_grad_norm` (engine.get_global_grad_norm). Returns False when
    the optimizer already has an overflow check of its own."""
    if hasattr(optimizer, "overflow"):
        return False
    original = optimizer.step

    def guarded_step(*args, **kwargs):
        norm = _grad_norm(optimizer)
        optimizer._global_grad_norm = norm
        optimizer.overflow = not math.isfinite(norm)
        if optimizer.overflow:
            return None
        return original(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = guarded_step
    return True


def step_skipped(engine, skipped_before: int, precision: str, min_loss_scale: float = 1.0) -> bool:
    """Whether the optimizer step just taken was skipped for a non-finite gradient norm."""
    if engine.skipped_steps == skipped_before:
        norm = engine.get_global_grad_norm()
        # Belt and braces: an applied step must have had a finite norm (None = not computed).
        return norm is not None and not math.isfinite(float(norm))
    if precision == "fp16":
        scale = getattr(engine.optimizer, "loss_scale", None)
        return scale is not None and float(scale) <= min_loss_scale
    return True
