"""Hard patch mining for SimMIM on Swin (mask.strategy: hpm; docs/hpm.md).

The method is HPM (Wang et al., CVPR 2023, arXiv 2304.05919): a light head learns, per mask
unit, how hard that unit is to reconstruct, from a *relative* objective (which of two units
reconstructs worse), and masks are drawn more and more from the units it ranks hardest
(easy-to-hard). Ultrasound makes this matter: most of a frame is speckle over homogeneous
tissue, and the boundaries of lesions and structures are the few hard units.

Three pieces, each a pure function of its inputs (exact on resume):
- `LossPredictor`: last-stage Swin features pooled to the mask-unit grid -> one score per unit.
- `ranking_loss`: pairwise logistic loss between scores, over the masked units of each image,
  against the true per-unit reconstruction error (the fused kernel's per-mask-patch sums).
- `mine_mask`: keeps the mask ratio, takes `hard_share` of the masked units as the top-scored
  ones and the rest from the loader's random mask; with hard_share 0 it IS the random mask.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class LossPredictor(nn.Module):
    """(B, h, w, C) NHWC last-stage features -> (B, u, u) float32 difficulty scores, u = the mask
    units per side. LayerNorm -> Linear -> GELU -> Linear per pooled cell: ~C*C/2 parameters,
    tiny next to the encoder; trained only through `ranking_loss`, left out of the export."""

    def __init__(self, dim: int, units_per_side: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(dim // 2, 16)
        self.units_per_side = int(units_per_side)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, last_stage: torch.Tensor) -> torch.Tensor:
        u = self.units_per_side
        x = last_stage.permute(0, 3, 1, 2)
        if x.shape[-2:] != (u, u):
            # Patch 2 leaves a last-stage grid finer than 32-px units (16 vs 8 at 256 px): average
            # its cells; a coarser grid is spread over the units it covers.
            x = F.adaptive_avg_pool2d(x, u)
        x = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return x.squeeze(-1).float()


def ranking_loss(scores: torch.Tensor, unit_loss: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs (i, j) of masked units of one image with unit_loss[i] != unit_loss[j]
    of BCEWithLogits(scores[i] - scores[j], unit_loss[i] > unit_loss[j]): only the order of the
    true losses is learnt, not their scale, which drifts as training lowers every loss.
    0 with zero gradient when no pair exists."""
    s = scores.flatten(1).float()
    t = unit_loss.flatten(1).float()
    v = unit_mask.flatten(1).to(torch.bool)
    order = torch.sign(t[:, :, None] - t[:, None, :])
    pairs = v[:, :, None] & v[:, None, :] & (order != 0)
    logits = s[:, :, None] - s[:, None, :]
    per_pair = F.binary_cross_entropy_with_logits(logits, (order > 0).float(), reduction="none")
    return torch.where(pairs, per_pair, per_pair.new_zeros(())).sum() / pairs.sum().clamp_min(1)


def hard_share(step: int, ratio: float, warmup_steps: int) -> float:
    """Share of the masked units chosen by difficulty at optimizer step `step`: a linear ramp from 0
    to `ratio` over `warmup_steps` (easy-to-hard), then constant."""
    if warmup_steps <= 0:
        return float(ratio)
    return float(ratio) * min(1.0, max(0, step) / warmup_steps)


def mining_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The CPU stream that orders the random part of a mined mask: a pure function of the run's
    seed and the position in training, so a resumed run mines exactly the same masks."""
    digest = hashlib.blake2b(repr(("hpm", seed, step, rank, micro)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@torch.no_grad()
def mine_mask(random_units: torch.Tensor, scores: torch.Tensor, share: float,
              generator: torch.Generator) -> torch.Tensor:
    """(B, u, u) uint8 unit mask with as many masked units per image as `random_units` has:
    round(share * n) of them are the highest `scores` (ties to the lower index), the others the
    loader's random units in a random order (`generator`). share 0 returns `random_units` itself."""
    B = random_units.shape[0]
    flat = random_units.flatten(1).to(torch.uint8)
    counts = flat.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"random unit masks must mask the same number of units per image, got {counts.tolist()}")
    n_mask = int(counts[0])
    n_hard = int(math.floor(share * n_mask + 0.5))
    if n_hard == 0:
        return random_units.to(torch.uint8)
    order = torch.sort(scores.flatten(1).float(), dim=1, descending=True, stable=True).indices
    chosen = torch.zeros_like(flat)
    chosen.scatter_(1, order[:, :n_hard], 1)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)
    # Random units not yet chosen rank first ([2, 3)), then other free units ([0, 1)), chosen last:
    # the random mask alone always has the n_mask - n_hard units still needed.
    priority = flat.float() * 2 + noise - chosen.float() * 4
    rest = torch.sort(priority, dim=1, descending=True, stable=True).indices[:, : n_mask - n_hard]
    chosen.scatter_(1, rest, 1)
    return chosen.view(B, *random_units.shape[1:])


def units_from_tokens(token_mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, u, u) unit mask from the (B, u*scale, u*scale) token mask the loader expands."""
    return token_mask[:, ::scale, ::scale]


def tokens_from_units(unit_mask: torch.Tensor, scale: int) -> torch.Tensor:
    B, u, _ = unit_mask.shape
    return unit_mask[:, :, None, :, None].expand(B, u, scale, u, scale).reshape(B, u * scale, u * scale)
