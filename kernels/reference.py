"""Plain PyTorch references of the fused losses (SPEC 3), usable on any device.

They define the semantics the Triton kernels must reproduce, are what training uses off CUDA,
and are differentiable through ordinary autograd (gradcheck in float64 runs on them). They are
written for clarity, not memory: the masked loss materializes |pred - target| and the
hierarchical loss a (B, C, K) gather, K being the table width (never B x C x C).

Conventions shared with the kernels:
- every loss is a float32 scalar computed in float32 whatever the input dtype (float64 inputs
  stay float64, for gradcheck);
- the denominator is clamped to 1, so nothing selected -> loss 0 with zero gradient;
- labels: 1 positive, 0 negative, anything else ignored;
- ties of the min / max go to the lowest node index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_l1_loss_reference", "masked_l1_patch_sums_reference", "hierarchical_minmax_loss_reference",
           "coherent_probs_reference", "table_extreme_reference"]


def masked_l1_loss_reference(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
                             patch_size: int) -> torch.Tensor:
    """L_MIM = sum over pixels in masked tokens |pred - target| / (masked pixels * channels)."""
    B, C, H, W = pred.shape
    p = int(patch_size)
    Hm, Wm = H // p, W // p
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    diff = (pred.to(compute) - target.to(compute)).abs()
    # Sum inside each patch at token resolution: no pixel-resolution mask is needed.
    per_token = diff.reshape(B, C, Hm, p, Wm, p).sum(dim=(3, 5)).sum(dim=1)        # (B, Hm, Wm)
    selected = token_mask.to(torch.bool)
    total = torch.where(selected, per_token, per_token.new_zeros(())).sum()
    masked_pixels = selected.sum() * (p * p * C)
    return total / masked_pixels.clamp_min(1).to(compute)


@torch.no_grad()
def masked_l1_patch_sums_reference(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
                                   patch_size: int, sum_patch: int) -> torch.Tensor:
    """(B, H/s, W/s): sum of |pred - target| over the masked pixels (all channels) of each s x s
    mask patch, s = sum_patch a multiple of patch_size; 0 for patches with nothing masked."""
    B, C, H, W = pred.shape
    p, k = int(patch_size), int(sum_patch) // int(patch_size)
    compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
    diff = (pred.to(compute) - target.to(compute)).abs()
    per_token = diff.reshape(B, C, H // p, p, W // p, p).sum(dim=(3, 5)).sum(dim=1)
    per_token = torch.where(token_mask.to(torch.bool), per_token, per_token.new_zeros(()))
    return per_token.reshape(B, H // (p * k), k, W // (p * k), k).sum(dim=(2, 4))


def table_extreme_reference(values: torch.Tensor, table: torch.Tensor, largest: bool):
    """For every row b and node v: the min (or max) of values[b, u] over u in table[v] (-1 = pad)
    and the node index u that attains it, lowest index on ties. Returns (extreme, index)."""
    valid = table >= 0                                                              # (C, K)
    idx = table.clamp_min(0).long()
    gathered = values[:, idx]                                                       # (B, C, K)
    fill = float("-inf") if largest else float("inf")
    gathered = gathered.masked_fill(~valid, fill)
    extreme = gathered.amax(-1) if largest else gathered.amin(-1)
    nan = gathered.isnan()
    # A NaN extreme is attained by the (lowest) NaN entry, so the NaN reaches the loss.
    hit = valid & torch.where(extreme.isnan().unsqueeze(-1), nan, gathered == extreme.unsqueeze(-1))
    index = torch.where(hit, idx, torch.iinfo(torch.int64).max).amin(-1)
    return extreme, index


def hierarchical_minmax_loss_reference(logits: torch.Tensor, labels: torch.Tensor,
                                       ancestor_table: torch.Tensor, descendant_table: torch.Tensor) -> torch.Tensor:
    """L_HIE = mean over non-ignored (b, v) of BCEWithLogits(z_hat, label), with z_hat the min of the
    logits over A*(v) for positives and the max over D*(v) for negatives (SPEC 3.2)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute)
    positive, negative = labels == 1, labels == 0
    with torch.no_grad():
        _, arg_min = table_extreme_reference(z, ancestor_table, largest=False)
        _, arg_max = table_extreme_reference(z, descendant_table, largest=True)
        arg = torch.where(positive, arg_min, arg_max).clamp_max(z.shape[1] - 1)
    # gather's backward routes the whole gradient to the selected logit, nothing to the others.
    z_hat = z.gather(1, arg)
    per_entry = F.binary_cross_entropy_with_logits(z_hat, positive.to(compute), reduction="none")
    valid = positive | negative
    total = torch.where(valid, per_entry, per_entry.new_zeros(())).sum()
    return total / valid.sum().clamp_min(1).to(compute)


@torch.no_grad()
def coherent_probs_reference(logits: torch.Tensor, descendant_table: torch.Tensor) -> torch.Tensor:
    """q_v = max over D*(v) of sigmoid(z_u) = sigmoid(max over D*(v) of z_u), float32 (float64 kept)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    extreme, _ = table_extreme_reference(logits.to(compute), descendant_table, largest=True)
    return torch.sigmoid(extreme)
