"""The encoder: a plain timm SwinTransformer, built by one function everyone shares.

Export and fine-tuning rebuild the same network with `create_encoder(model_cfg)` (or the same
`timm.create_model(**encoder_kwargs(model_cfg))` call), so `encoder.state_dict()` from
pretraining loads strictly into it anywhere, with no key renaming.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..config import ModelConfig
from .archs import swin_layout


def encoder_kwargs(model_cfg: ModelConfig) -> dict:
    """Arguments of the `timm.create_model` call that builds the encoder (no classifier head)."""
    layout = swin_layout(model_cfg)
    return dict(
        model_name=model_cfg.arch,
        pretrained=False,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        window_size=model_cfg.window_size,
        in_chans=model_cfg.in_chans,
        num_classes=0,
        drop_path_rate=model_cfg.drop_path_rate,
        embed_dim=layout["embed_dim"],
        depths=tuple(layout["depths"]),
        num_heads=tuple(layout["num_heads"]),
    )


def create_encoder(model_cfg: ModelConfig) -> nn.Module:
    """timm SwinTransformer for `model_cfg` (builds on whatever default device is active, meta included)."""
    return timm.create_model(**encoder_kwargs(model_cfg))


def stage_dims(model_cfg: ModelConfig) -> list[int]:
    """Channel width of each stage output (Swin doubles it at every patch merging)."""
    layout = swin_layout(model_cfg)
    return [layout["embed_dim"] * 2 ** i for i in range(len(layout["depths"]))]


def stage_grids(model_cfg: ModelConfig) -> list[int]:
    """Side of each stage's token grid (timm rounds odd grids up when merging)."""
    grid = model_cfg.img_size // model_cfg.patch_size
    grids = []
    for _ in swin_layout(model_cfg)["depths"]:
        grids.append(grid)
        grid = (grid + 1) // 2
    return grids


def run_stages(encoder: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Run a timm Swin's stages on patch-embedded NHWC tokens; returns every stage output (NHWC).

    The last output goes through `encoder.norm`, as in timm's `forward_features`, so the
    heads see exactly what a fine-tuned plain timm model sees. Gradient checkpointing is the
    stages' own (`encoder.set_grad_checkpointing`): one checkpoint per Swin block.
    """
    outputs = []
    x = tokens
    for stage in encoder.layers:
        x = stage(x)
        outputs.append(x)
    outputs[-1] = encoder.norm(outputs[-1])
    return outputs
