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


def set_encoder_input_size(encoder: nn.Module, img_size: int, window_size: int) -> None:
    """Switch a built timm Swin to square inputs of `img_size` (the progressive schedule,
    train/stages.py), changing buffers only: the attention masks and the token-grid bookkeeping.

    A parameter depends on the input size only through a window that timm shrinks to a smaller
    grid (the relative-position bias table is (2w-1)^2 x heads). Such a change is refused before
    anything is touched: under ZeRO-3 the partitioned parameters cannot be replaced mid-run, and
    the optimizer would keep the old tensors."""
    grid = img_size // encoder.patch_embed.patch_size[0]
    for s, stage in enumerate(encoder.layers):
        out = -(-grid // 2 ** s)  # timm rounds an odd grid up at each patch merging
        wanted = (min(window_size, out),) * 2
        for b, block in enumerate(stage.blocks):
            if tuple(block.attn.window_size) != wanted:
                raise ValueError(
                    f"input size {img_size}: Swin stage {s} would run {wanted[0]}x{wanted[1]} windows on its "
                    f"{out}x{out} grid, block {b} was built for {block.attn.window_size[0]}x"
                    f"{block.attn.window_size[1]}; that would resize its relative-position parameters")
    before = _parameter_layout(encoder)
    encoder.set_input_size(img_size=(img_size, img_size), window_size=window_size)
    after = _parameter_layout(encoder)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise RuntimeError(f"switching the encoder to {img_size} px changed parameters {changed[:5]}")


def _parameter_layout(module: nn.Module) -> dict[str, tuple]:
    """name -> (object id, full shape); ZeRO-3 keeps a partitioned parameter's shape in ds_shape."""
    return {name: (id(p), tuple(getattr(p, "ds_shape", p.shape))) for name, p in module.named_parameters()}


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
