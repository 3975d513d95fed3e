"""Training augmentation of fine-tuning samples: small geometric and intensity changes.

Geometric (image and mask together): scale 1 +- SCALE, rotation +- ROTATE_DEG, shift +- SHIFT of
the side, about the centre; pixels moved in from outside are 0 (black, like the area around an
ultrasound sector; background in masks). Intensity (image only): contrast x (1 +- CONTRAST) about
the mean, brightness +- BRIGHTNESS (images are in [0, 1]). The ranges stay small on purpose: probe
geometry and gain vary this much between scans, while larger warps would distort the anatomy a
label describes. Randomness comes from the caller's seeded `random.Random`, so every DataLoader
worker count gives the same batches.
"""
from __future__ import annotations

import random

import cv2
import numpy as np

SCALE, ROTATE_DEG, SHIFT = 0.10, 10.0, 0.05
CONTRAST, BRIGHTNESS = 0.10, 0.05


def augment(img: np.ndarray, mask: np.ndarray | None, rng: random.Random) -> tuple[np.ndarray, np.ndarray | None]:
    """(S, S) float32 image in [0, 1] and optional (S, S) int label map -> augmented copies."""
    size = img.shape[0]
    scale = 1.0 + rng.uniform(-SCALE, SCALE)
    angle = rng.uniform(-ROTATE_DEG, ROTATE_DEG)
    dx, dy = (rng.uniform(-SHIFT, SHIFT) * size for _ in range(2))
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), angle, scale)
    matrix[:, 2] += (dx, dy)
    out = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0.0)
    contrast = 1.0 + rng.uniform(-CONTRAST, CONTRAST)
    mean = float(out.mean())
    out = np.clip((out - mean) * contrast + mean + rng.uniform(-BRIGHTNESS, BRIGHTNESS), 0.0, 1.0)
    if mask is not None:
        mask = cv2.warpAffine(mask.astype(np.int32), matrix, (size, size), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.int64)
    return out.astype(np.float32), mask
