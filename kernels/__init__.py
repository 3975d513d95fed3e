"""Fused Triton losses and their PyTorch references (installed as echocare_dist.kernels).

    masked_l1_loss(pred, target, token_mask, patch_size, impl="auto")            SPEC 3.1
    masked_l1_loss_and_patch_sums(pred, target, token_mask, patch_size, sum_patch, impl="auto")
                                                       the same loss + per-mask-patch sums (HPM)
    hierarchical_minmax_loss(logits, labels, ancestor_table, descendant_table, impl="auto")  SPEC 3.2
    coherent_probs(logits, descendant_table, impl="auto")                        inference op

impl "auto" runs Triton on CUDA tensors and the reference elsewhere; "triton" / "torch" force
one. Importing this package needs neither a GPU nor Triton. See docs/kernels.md.
"""
from .functional import (HAS_TRITON, IMPLS, coherent_probs, hierarchical_minmax_loss, masked_l1_loss,
                         masked_l1_loss_and_patch_sums, use_triton)
from .modules import HierarchicalMinMaxLoss, MaskedL1Loss
from .reference import (coherent_probs_reference, hierarchical_minmax_loss_reference, masked_l1_loss_reference,
                        masked_l1_patch_sums_reference)
from .tables import TableError, index_table

__all__ = [
    "HAS_TRITON", "IMPLS", "use_triton",
    "masked_l1_loss", "masked_l1_loss_and_patch_sums", "hierarchical_minmax_loss", "coherent_probs",
    "MaskedL1Loss", "HierarchicalMinMaxLoss",
    "masked_l1_loss_reference", "masked_l1_patch_sums_reference", "hierarchical_minmax_loss_reference",
    "coherent_probs_reference",
    "TableError", "index_table",
]
