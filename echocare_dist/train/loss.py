"""L_PRE = L_MIM + lambda * L_HIE (SPEC 3) [+ w * L_RANK under mask.strategy=hpm], on top of the
fused kernels or their references."""
from __future__ import annotations

import torch

from ..config import Config
from ..ontology import Ontology


class PretrainLoss:
    def __init__(self, cfg: Config, ontology: Ontology):
        from ..kernels import hierarchical_minmax_loss, masked_l1_loss, masked_l1_loss_and_patch_sums

        self._masked_l1, self._hierarchical = masked_l1_loss, hierarchical_minmax_loss
        self._masked_l1_and_sums = masked_l1_loss_and_patch_sums
        self.patch_size = cfg.model.patch_size
        self.impl = cfg.loss.impl
        self.hie_weight = cfg.loss.hie_weight
        self.use_hie = cfg.model.hie_head and cfg.loss.hie_weight > 0
        self.hpm = cfg.mask.strategy == "hpm"
        self.mask_patch = cfg.mask.mask_patch_size
        self.hpm_weight = cfg.mask.hpm_loss_weight
        # The ontology's tables are read-only arrays: the kernels cache their device copies.
        self.ancestor_table = ontology.ancestor_table
        self.descendant_table = ontology.descendant_table
        # Last micro-batch's predictor terms (hpm): the ranking loss and the true per-unit mean
        # |error| over masked units, (B, u, u); for logging and the benchmark, never for gradients.
        self.last_rank: torch.Tensor | None = None
        self.last_unit_loss: torch.Tensor | None = None

    def __call__(self, out: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, mim, hie); the parts are for logging."""
        recon = out["recon"].float()
        if self.hpm:
            mim, total = self._mim_and_ranking(out, batch, recon)
        else:
            mim = self._masked_l1(recon, batch["target"], batch["mask"], self.patch_size, impl=self.impl)
            total = mim
        if self.use_hie:
            hie = self._hierarchical(out["logits"].float(), batch["labels"], self.ancestor_table,
                                     self.descendant_table, impl=self.impl)
            return total + self.hie_weight * hie, mim, hie
        return total, mim, torch.zeros_like(mim)

    def _mim_and_ranking(self, out: dict, batch: dict, recon: torch.Tensor):
        from ..models.hpm import ranking_loss, units_from_tokens

        # One pass of the fused kernel gives the loss and every unit's |error| sum.
        mim, sums = self._masked_l1_and_sums(recon, batch["target"], batch["mask"], self.patch_size,
                                             self.mask_patch, impl=self.impl)
        units = units_from_tokens(batch["mask"], self.mask_patch // self.patch_size)
        unit_loss = sums / float(self.mask_patch ** 2 * recon.shape[1])
        rank = ranking_loss(out["difficulty"], unit_loss, units)
        self.last_rank, self.last_unit_loss = rank.detach(), unit_loss.detach()
        return mim, mim + self.hpm_weight * rank
