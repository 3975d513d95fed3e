"""Analytic FLOPs of one image through EchoCareMIM, from the architecture alone.

Convention: 1 multiply-add = 2 FLOPs, counting matrix products and convolutions only (patch
embedding, qkv / attention / proj / MLP matmuls per window, patch merging, decoder convs,
head). Norms, softmax, GELU, residual adds and biases are left out, which is what
torch.utils.flop_counter.FlopCounterMode counts too (tests hold the two within 5 %).
Training = 3 x forward (backward costs two forwards); recomputation by gradient
checkpointing is NOT counted, as usual for MFU (it is overhead, not model work).
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from .archs import swin_layout
from .encoder import stage_dims, stage_grids

MLP_RATIO = 4  # timm's Swin default, which encoder_kwargs never overrides


def _swin_block_flops(grid: int, dim: int, window: int) -> int:
    ws = min(window, grid)                      # timm shrinks the window to a smaller grid
    windows = math.ceil(grid / ws) ** 2         # a grid not divisible by the window is padded
    n = ws * ws                                 # tokens per window
    padded_tokens = windows * n
    qkv = 2 * padded_tokens * dim * 3 * dim
    scores_and_mix = 2 * 2 * windows * n * n * dim   # q @ k^T and attn @ v, summed over heads
    proj = 2 * padded_tokens * dim * dim
    mlp = 2 * 2 * grid * grid * dim * MLP_RATIO * dim
    return qkv + scores_and_mix + proj + mlp


def encoder_flops(model_cfg: ModelConfig) -> int:
    layout = swin_layout(model_cfg)
    dims, grids = stage_dims(model_cfg), stage_grids(model_cfg)
    p = model_cfg.patch_size
    total = 2 * grids[0] ** 2 * dims[0] * model_cfg.in_chans * p * p          # patch embed conv
    for stage, depth in enumerate(layout["depths"]):
        if stage > 0:                                                         # patch merging 4C -> 2C
            total += 2 * grids[stage] ** 2 * 4 * dims[stage - 1] * dims[stage]
        total += depth * _swin_block_flops(grids[stage], dims[stage], model_cfg.window_size)
    return total


def decoder_flops(model_cfg: ModelConfig) -> int:
    dims, grids = stage_dims(model_cfg), stage_grids(model_cfg)
    c = model_cfg.in_chans
    if model_cfg.decoder == "linear":
        stride = model_cfg.patch_size * 2 ** (len(dims) - 1)
        return 2 * grids[-1] ** 2 * dims[-1] * stride * stride * c
    d, p = model_cfg.decoder_dim, model_cfg.patch_size
    lateral = sum(2 * g * g * dim * d for g, dim in zip(grids, dims))
    blocks = sum(2 * g * g * d * d * 9 for g in grids)
    predict = 2 * grids[0] ** 2 * d * p * p * c
    return lateral + blocks + predict


def head_flops(model_cfg: ModelConfig, num_classes: int) -> int:
    return 2 * stage_dims(model_cfg)[-1] * num_classes if model_cfg.hie_head else 0


def flops_per_image(model_cfg: ModelConfig, num_classes: int, hpm: bool = False) -> dict:
    """dict(forward, train=3*forward, encoder, decoder, head) in FLOPs per image. hpm (hard patch
    mining) adds its mask-choosing pass to train: one no-grad encoder forward of the unmasked image
    (the loss predictor on top is a per-unit MLP, negligible and left out like the norms)."""
    enc, dec, head = encoder_flops(model_cfg), decoder_flops(model_cfg), head_flops(model_cfg, num_classes)
    forward = enc + dec + head
    return dict(forward=forward, train=3 * forward + (enc if hpm else 0), encoder=enc, decoder=dec, head=head,
                mining=enc if hpm else 0)
