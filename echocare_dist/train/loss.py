"""L_PRE = L_MIM + lambda * L_HIE (SPEC 3), on top of the fused kernels or their references."""
from __future__ import annotations

import torch

from ..config import Config
from ..ontology import Ontology


class PretrainLoss:
    def __init__(self, cfg: Config, ontology: Ontology):
        from ..kernels import hierarchical_minmax_loss, masked_l1_loss

        self._masked_l1, self._hierarchical = masked_l1_loss, hierarchical_minmax_loss
        self.patch_size = cfg.model.patch_size
        self.impl = cfg.loss.impl
        self.hie_weight = cfg.loss.hie_weight
        self.use_hie = cfg.model.hie_head and cfg.loss.hie_weight > 0
        # The ontology's tables are read-only arrays: the kernels cache their device copies.
        self.ancestor_table = ontology.ancestor_table
        self.descendant_table = ontology.descendant_table

    def __call__(self, out: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, mim, hie); the parts are for logging."""
        mim = self._masked_l1(out["recon"].float(), batch["target"], batch["mask"], self.patch_size, impl=self.impl)
        if self.use_hie:
            hie = self._hierarchical(out["logits"].float(), batch["labels"], self.ancestor_table,
                                     self.descendant_table, impl=self.impl)
            return mim + self.hie_weight * hie, mim, hie
        return mim, mim, torch.zeros_like(mim)
