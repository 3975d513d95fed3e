"""SimMIM mask generator (SPEC 2), seeded per sample.

The image (model.img_size) is cut into mask units of mask.mask_patch_size pixels; exactly
round(mask_ratio * units) of them are masked (round half up), and each unit covers
(mask_patch_size / model.patch_size)^2 tokens. The mask is returned at token resolution only:
nothing upsamples it to pixels (the fused loss reads it per patch).

Which units are masked is a pure function of (data.seed, epoch, sample key): counter-based
(splitmix64 over the unit index) rather than a stateful generator, so the DALI loader and the
fallback give the very same mask to the same image in the same epoch, a resumed run needs no
mask-RNG state, and a sample gets a fresh mask every epoch.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def sample_stream_ids(keys: Sequence[str], *parts) -> np.ndarray:
    """uint64 per key: a stream id for counter-based draws, salted with `parts` (seed, epoch, ...)."""
    salt = repr(parts).encode() + b"\0"
    return np.fromiter((int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64, count=len(keys))


class MaskGenerator:
    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float,
                 seed: int = 0):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"mask geometry: input {input_size} must be a multiple of mask patch "
                             f"{mask_patch_size}, itself a multiple of model patch {model_patch_size}")
        self.units_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_units = self.units_per_side ** 2
        self.num_masked = int(math.floor(mask_ratio * self.num_units + 0.5))
        self.seed = seed

    @classmethod
    def from_config(cls, cfg) -> "MaskGenerator":
        return cls(cfg.model.img_size, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio,
                   cfg.data.seed)

    @property
    def token_grid(self) -> int:
        return self.units_per_side * self.scale

    def unit_masks(self, keys: Sequence[str], epoch: int, copies: Sequence[int] | None = None) -> np.ndarray:
        """uint8 (B, u, u), 1 = masked unit, exactly `num_masked` ones per sample. `copies`: a
        mixture's repeat numbers (data/mixture.py); a repeat (copy > 0) gets a mask of its own."""
        ids = sample_stream_ids(keys, "mask", self.seed, epoch)
        if copies is not None:
            for j in np.flatnonzero(np.asarray(copies) > 0):
                ids[j] = sample_stream_ids([keys[j]], "mask", self.seed, epoch, "copy", int(copies[j]))[0]
        with np.errstate(over="ignore"):
            draws = _splitmix64(ids[:, None] + np.arange(1, self.num_units + 1, dtype=np.uint64)[None, :] * _GOLDEN)
        # The num_masked smallest draws are masked (ties are impossible in practice, and argsort
        # is stable anyway, so the result is deterministic).
        rank = np.argsort(draws, axis=1, kind="stable")[:, : self.num_masked]
        mask = np.zeros((len(keys), self.num_units), np.uint8)
        np.put_along_axis(mask, rank, 1, axis=1)
        return mask.reshape(len(keys), self.units_per_side, self.units_per_side)

    def token_masks(self, keys: Sequence[str], epoch: int, device: torch.device | str = "cpu",
                    copies: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 (B, H/p, W/p) on `device`: unit masks expanded to tokens there (a small copy)."""
        units = torch.from_numpy(self.unit_masks(keys, epoch, copies)).to(device, non_blocking=True)
        n, u, s = units.shape[0], self.units_per_side, self.scale
        return units[:, :, None, :, None].expand(n, u, s, u, s).reshape(n, u * s, u * s)
