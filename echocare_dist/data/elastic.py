"""The global-batch rule of a resume on another world size (docs/data.md).

The LR schedule (optim.scaled_lr, the warmup and cosine over optimizer steps) and the samples per
optimizer step both follow the global batch = train.micro_batch x train.grad_accum x ranks. A
resume on another world size holds the saved global batch G and re-derives the other two:

1. the configured micro-batch and accumulation, when they already give G on the new ranks;
2. else the configured micro-batch m with accumulation G / (m x ranks), when that is whole;
3. else the largest micro-batch m' < m with G divisible by m' x ranks (so memory per rank never
   grows), accumulation G / (m' x ranks);
4. else (G not divisible by the ranks) a ConfigError naming the options: no split keeps G.
"""
from __future__ import annotations

from ..config import ConfigError


def held_batch(global_batch: int, world_size: int, micro_batch: int, grad_accum: int) -> tuple[int, int]:
    """(train.micro_batch, train.grad_accum) that keep `global_batch` on `world_size` ranks."""
    if global_batch <= 0 or world_size <= 0:
        raise ConfigError(f"cannot hold a global batch of {global_batch} on {world_size} rank(s)")
    if micro_batch * grad_accum * world_size == global_batch:
        return micro_batch, grad_accum
    for m in range(min(micro_batch, global_batch), 0, -1):
        if global_batch % (m * world_size) == 0:
            return m, global_batch // (m * world_size)
    raise ConfigError(
        f"the checkpoint's global batch {global_batch} (train.micro_batch x train.grad_accum x ranks) cannot "
        f"be split over {world_size} rank(s): it is not a multiple of {world_size}. Resume on a world size "
        f"that divides {global_batch}, or start a new run with train.micro_batch / train.grad_accum of your choice")
