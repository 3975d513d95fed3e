"""SPEC 5 augmentation: the definition both loaders implement, and its PIL/numpy version.

Per sample, in this order:
1. with probability rrc_prob a random resized crop (area fraction ~ U[rrc_scale], aspect ratio
   log-uniform in rrc_ratio, up to 10 tries, else the whole image) resized to img_size, otherwise a
   plain resize of the whole image to img_size; bilinear with antialiasing, 8-bit result;
2. horizontal flip with probability hflip_prob, vertical flip with probability vflip_prob;
3. to float in [0, 1]; with probability jitter_prob, x <- clamp(b * (0.5 + c * (x - 0.5)), 0, 1)
   with b ~ U[1 - brightness, 1 + brightness] and c ~ U[1 - contrast, 1 + contrast].
The result is the reconstruction target; the model input is (target - norm_mean) / norm_std.
Steps 1-2 run in the reader (DALI operators in dali_loader.py, PIL here), which also draws the
jitter factors; step 3 runs once per batch on the training device (`apply_jitter`), shared by both
loaders, on 8-bit images (4x less to copy than float).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

RRC_ATTEMPTS = 10


@dataclass(frozen=True)
class AugmentParams:
    size: int
    rrc_prob: float
    rrc_scale: tuple[float, float]
    rrc_ratio: tuple[float, float]
    hflip_prob: float
    vflip_prob: float
    jitter_prob: float
    brightness: float
    contrast: float

    @classmethod
    def from_config(cls, cfg) -> "AugmentParams":
        a = cfg.data.augment
        return cls(cfg.model.img_size, a.rrc_prob, tuple(a.rrc_scale), tuple(a.rrc_ratio), a.hflip_prob,
                   a.vflip_prob, a.jitter_prob, a.brightness, a.contrast)


def random_crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random resized crop (the torchvision / DALI sampling)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    return 0, 0, width, height


def decode_gray(jpg: bytes) -> Image.Image:
    """8-bit grayscale PIL image; raises OSError/ValueError on damaged data (never a partial image)."""
    im = Image.open(io.BytesIO(jpg))
    im.load()
    return im if im.mode == "L" else im.convert("L")


def augment(im: Image.Image, rng: np.random.Generator, p: AugmentParams) -> tuple[np.ndarray, tuple[float, float]]:
    """Steps 1-2 above on `im` -> uint8 (size, size), and the step-3 factors (b, c) for `apply_jitter`
    ((1, 1) when the coin says no jitter). Draws from `rng` in a fixed order."""
    width, height = im.size
    if rng.random() < p.rrc_prob:
        left, top, w, h = random_crop_box(rng, width, height, p.rrc_scale, p.rrc_ratio)
        box = (left, top, left + w, top + h)
    else:
        box = (0, 0, width, height)
    out = np.asarray(im.resize((p.size, p.size), Image.BILINEAR, box=box, reducing_gap=None))
    if rng.random() < p.hflip_prob:
        out = out[:, ::-1]
    if rng.random() < p.vflip_prob:
        out = out[::-1, :]
    jitter = (1.0, 1.0)
    if rng.random() < p.jitter_prob:
        jitter = (rng.uniform(1.0 - p.brightness, 1.0 + p.brightness), rng.uniform(1.0 - p.contrast, 1.0 + p.contrast))
    return np.ascontiguousarray(out), jitter


def apply_jitter(images: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Step 3 for a batch, on whatever device the batch is (the training device): uint8 (B,1,H,W) and
    (B, 2) factors (b, c) -> float32 target in [0, 1]. Both loaders finish their batches here.

    b * (0.5 + c * (x/255 - 0.5)) = x * (b c / 255) + b (1 - c) / 2: one fused pass plus the clamp."""
    jitter = jitter.to(device=images.device, dtype=torch.float32)
    b, c = jitter[:, 0].view(-1, 1, 1, 1), jitter[:, 1].view(-1, 1, 1, 1)
    return torch.addcmul(b * (1.0 - c) * 0.5, images, b * c * (1.0 / 255.0)).clamp_(0.0, 1.0)
