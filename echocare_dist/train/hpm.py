"""The mask-mining pass of mask.strategy=hpm (docs/hpm.md), between the loader and the step.

Where the predictions come from: one extra no-grad forward of the UNMASKED micro-batch through
the encoder and the loss predictor (eval mode: no stochastic depth, so it draws nothing from the
training RNG streams). The alternative, reusing the previous epoch's scores of the same sample,
would need per-sample state in every checkpoint and scores up to an epoch stale; the extra pass
costs one encoder forward (~1/3 of a training step's FLOPs at most, less with the decoder and
the backward counted: benchmarks/hpm.py measures it) and keeps a resume exact with no new state.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..models.hpm import hard_share, mine_mask, mining_generator, tokens_from_units, units_from_tokens


class HardPatchMiner:
    def __init__(self, cfg: Config, rank: int):
        m = cfg.mask
        self.scale = m.mask_patch_size // cfg.model.patch_size
        self.ratio = m.hpm_ratio
        self.warmup = cfg.train.steps if m.hpm_warmup_steps is None else m.hpm_warmup_steps
        self.seed = cfg.train.seed
        self.rank = rank
        self.last_share = 0.0

    def share(self, step: int) -> float:
        return hard_share(step, self.ratio, self.warmup)

    @torch.no_grad()
    def remask(self, engine, batch: dict, step: int, micro: int) -> dict:
        """`batch` with its token mask replaced by the mined one (same number of masked units)."""
        share = self.share(step)
        self.last_share = share
        if share <= 0:
            return batch   # the random mask as it is: bit-identical to mask.strategy=random
        module = engine.module
        was_training = module.training
        module.train(False)
        try:
            scores = engine(batch["input"], None, True)["difficulty"]
        finally:
            module.train(was_training)
        random_units = units_from_tokens(batch["mask"], self.scale)
        mined = mine_mask(random_units, scores, share, mining_generator(self.seed, step, self.rank, micro))
        return dict(batch, mask=tokens_from_units(mined, self.scale).to(batch["mask"].dtype))
