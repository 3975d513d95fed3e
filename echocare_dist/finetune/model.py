"""Task models over an exported encoder, and their optimizer parameter groups.

- classification / regression: the encoder's pooled last stage (timm's own head path with
  num_classes=0: final norm + global average pool) -> Linear.
- segmentation: the four stage outputs -> the repository's FPN-style multi-scale decoder (lateral
  1x1 convs, top-down upsampling + conv blocks, PixelShuffle back to input resolution), here
  predicting one logit per class and pixel instead of reconstructed pixels.

Linear probe: the encoder is frozen and stays in eval mode (no drop path, no gradients).
Layer-wise LR decay (timm's `param_groups_layer_decay` over Swin's `group_matcher`): one layer id
per block, lr_scale = layer_decay ** (number of blocks above it); the last block, the final norm
and the head/decoder get the full LR, patch merging shares its stage's first block, the stem is lowest.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.decoders import MultiScaleDecoder
from ..models.encoder import run_stages


# Tasks whose head is the multi-scale decoder predicting `num_outputs` maps at input resolution
# (landmark heatmaps, CenterNet maps, the enhanced image: finetune/tasks/).
DENSE_TASKS = ("segmentation", "landmarks", "detection", "enhancement")


class TaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, frozen: bool):
        super().__init__()
        self.encoder = encoder
        self.frozen = frozen
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self


class PooledHeadModel(TaskModel):
    """(B, C_in, H, W) -> (B, num_outputs)."""

    def __init__(self, encoder: nn.Module, num_outputs: int, frozen: bool = False):
        super().__init__(encoder, frozen)
        self.head = nn.Linear(encoder.num_features, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.encoder(x)  # num_classes=0: pooled, normalized features
        return self.head(features)


class SegmentationModel(TaskModel):
    """(B, C_in, H, W) -> (B, num_classes, H, W) logits."""

    def __init__(self, encoder: nn.Module, num_classes: int, decoder_dim: int, frozen: bool = False):
        super().__init__(encoder, frozen)
        dims = [int(info["num_chs"]) for info in encoder.feature_info]
        patch = encoder.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.decoder = MultiScaleDecoder(dims, decoder_dim, patch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = run_stages(self.encoder, self.encoder.patch_embed(x))
        return self.decoder(features)


def build_task_model(task: str, encoder: nn.Module, num_outputs: int, frozen: bool,
                     decoder_dim: int) -> TaskModel:
    if task in DENSE_TASKS:
        return SegmentationModel(encoder, num_outputs, decoder_dim, frozen)
    return PooledHeadModel(encoder, num_outputs, frozen)


def param_groups(model: TaskModel, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with an `lr_scale` each; no decay on 1-D params, biases and relative position tables."""
    from timm.optim import param_groups_layer_decay

    groups = []
    if not model.frozen:
        groups = param_groups_layer_decay(model.encoder, weight_decay=weight_decay,
                                          no_weight_decay_list=tuple(model.encoder.no_weight_decay()),
                                          layer_decay=layer_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.startswith("encoder.") or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups += [dict(params=decay, weight_decay=weight_decay, lr_scale=1.0),
               dict(params=no_decay, weight_decay=0.0, lr_scale=1.0)]
    return [g for g in groups if g["params"]]
