"""Reconstruction decoders (SPEC 2). Both read ONLY the encoder's stage outputs.

Never give a decoder the raw image or the patch embedding before masking: either one carries
the masked pixels straight to the prediction and the pretext task becomes copying.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class ConvBlock(nn.Module):
    """3x3 conv -> per-position LayerNorm -> GELU. LayerNorm (not BatchNorm) keeps every sample
    independent of the rest of the batch and of the batch size."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm = LayerNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MultiScaleDecoder(nn.Module):
    """FPN-style top-down decoder over all stages, predicting pixels at full resolution.

    Lateral 1x1 convs bring every stage to `decoder_dim`; from the coarsest stage down, the
    running map is upsampled 2x, added to the next lateral and refined by a ConvBlock. The
    finest map (one vector per patch token) goes through a 1x1 conv to p*p*in_chans values,
    unfolded to pixels by PixelShuffle(p).
    """

    def __init__(self, stage_dims: list[int], decoder_dim: int, patch_size: int, in_chans: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(d, decoder_dim, kernel_size=1) for d in stage_dims)
        self.blocks = nn.ModuleList(ConvBlock(decoder_dim) for _ in stage_dims)
        self.predict = nn.Conv2d(decoder_dim, patch_size * patch_size * in_chans, kernel_size=1)
        self.unfold = nn.PixelShuffle(patch_size)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        y = None
        for level in reversed(range(len(features))):
            # NHWC -> NCHW is a stride permutation (no copy); the convs accept channels-last input.
            lateral = self.lateral[level](features[level].permute(0, 3, 1, 2))
            if y is not None:
                lateral = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.blocks[level](lateral)
        return self.unfold(self.predict(y))


class LinearDecoder(nn.Module):
    """SimMIM's head: 1x1 conv on the last stage to stride^2*in_chans values + PixelShuffle(stride)."""

    def __init__(self, last_dim: int, stride: int, in_chans: int):
        super().__init__()
        self.predict = nn.Conv2d(last_dim, stride * stride * in_chans, kernel_size=1)
        self.unfold = nn.PixelShuffle(stride)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.unfold(self.predict(features[-1].permute(0, 3, 1, 2)))


def build_decoder(kind: str, stage_dims: list[int], decoder_dim: int, patch_size: int,
                  in_chans: int) -> nn.Module:
    if kind == "multiscale":
        return MultiScaleDecoder(stage_dims, decoder_dim, patch_size, in_chans)
    if kind == "linear":
        stride = patch_size * 2 ** (len(stage_dims) - 1)
        return LinearDecoder(stage_dims[-1], stride, in_chans)
    raise ValueError(f"model.decoder={kind!r} is not one of ['multiscale', 'linear']")
