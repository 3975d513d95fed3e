"""nn.Module wrappers of the losses (the third leg of the Liger-Kernel triad: op, Function, Module)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .functional import IMPLS, hierarchical_minmax_loss, masked_l1_loss


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class MaskedL1Loss(nn.Module):
    """forward(pred, target, token_mask) -> float32 scalar L_MIM (SPEC 3.1)."""

    def __init__(self, patch_size: int, impl: str = "auto"):
        super().__init__()
        self.patch_size = int(patch_size)
        self.impl = _check_impl(impl)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return masked_l1_loss(pred, target, token_mask, self.patch_size, self.impl)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, impl={self.impl!r}"


class HierarchicalMinMaxLoss(nn.Module):
    """forward(logits, labels) -> float32 scalar L_HIE (SPEC 3.2).

    The closure tables are non-persistent buffers: they follow .to(device) but stay out of
    checkpoints (they are derived from the ontology, whose hash the checkpoint records)."""

    def __init__(self, ancestor_table, descendant_table, impl: str = "auto"):
        super().__init__()
        self.impl = _check_impl(impl)
        self.register_buffer("ancestor_table", torch.as_tensor(np.array(ancestor_table, dtype=np.int32)),
                             persistent=False)
        self.register_buffer("descendant_table", torch.as_tensor(np.array(descendant_table, dtype=np.int32)),
                             persistent=False)

    @classmethod
    def from_ontology(cls, ontology, impl: str = "auto") -> "HierarchicalMinMaxLoss":
        return cls(ontology.ancestor_table, ontology.descendant_table, impl)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return hierarchical_minmax_loss(logits, labels, self.ancestor_table, self.descendant_table, self.impl)

    def extra_repr(self) -> str:
        return f"num_nodes={self.ancestor_table.shape[0]}, impl={self.impl!r}"
