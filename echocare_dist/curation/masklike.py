"""Is this file a segmentation mask rather than an ultrasound image? One rule for the shard
builder and the fine-tuning runner.

Public collections ship masks beside their images (`benign (1)_mask.png`, `mask_12.png`,
`case3_seg.png`, `labels/...`); left alone they become pretraining images or class samples.

By name: the file name (not its folders) matches one of `patterns` (fnmatch, case-insensitive).
By content: a mask has nearly all pixels at two levels (or at a handful, for multi-class label
maps), up to anti-aliased or JPEG-blurred edges, and its regions are flat. B-mode content always
carries speckle, a multiplicative noise, so the second test keeps a mostly black frame with a
small sector, or a dark frame whose pixels crowd the low levels, out of the mask class.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import PurePath

import cv2
import numpy as np

# The defaults of curation.mask_name_patterns. `*label*` also matches "unlabeled_07.png": a
# source whose images are named so sets its own patterns or `allow_mask_like: true`.
DEFAULT_MASK_NAME_PATTERNS: tuple[str, ...] = ("*_mask*", "mask_*", "*_seg*", "*label*")

# Content thresholds, measured on 151 BUSI masks (and copies resized, blurred, JPEG-70 re-saved,
# 16-bit, RGB: two-level share >= 0.979, texture <= 0.0013) and 149 BUSI images (two-level share
# <= 0.57, texture >= 0.0067); tests/test_curation_masks.py has generated counterparts of each case.
LEVEL_TOLERANCE = 6          # gray levels within this distance of a peak count as that peak
TWO_LEVEL_SHARE = 0.95       # share of pixels near the two main peaks for "two levels"
FEW_LEVELS = 8               # a multi-class label map has at most this many levels ...
FEW_LEVELS_SHARE = 0.97      # ... holding this share of the pixels
MAX_TEXTURE = 0.004          # speckle contrast of the foreground interior (masks ~0, B-mode more)


@dataclass(frozen=True)
class MaskStats:
    two_level_share: float   # share of pixels within LEVEL_TOLERANCE of the two main peaks
    few_levels_share: float  # share of pixels at the FEW_LEVELS most common exact levels
    texture: float           # speckle contrast inside the non-background regions (0 when none)

    @property
    def mask_like(self) -> bool:
        few = self.two_level_share >= TWO_LEVEL_SHARE or self.few_levels_share >= FEW_LEVELS_SHARE
        return few and self.texture < MAX_TEXTURE


def mask_name_pattern(path: str | PurePath, patterns=DEFAULT_MASK_NAME_PATTERNS) -> str | None:
    """The first of `patterns` that the file name of `path` matches (case-insensitive), or None."""
    name = PurePath(str(path).replace("\\", "/")).name.lower()
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p.lower())), None)


def is_mask_like_name(path: str | PurePath, patterns=DEFAULT_MASK_NAME_PATTERNS) -> bool:
    """True when the file name of `path` matches one of the glob `patterns` (case-insensitive)."""
    return mask_name_pattern(path, patterns) is not None


def _to_gray8(array) -> np.ndarray:
    """Any mask-ish array (bool, 8/16-bit, float, gray/RGB/RGBA) -> 2-D uint8. Non-uint8 data is
    stretched from its own min..max, so a 16-bit 0/1 label map becomes 0/255, not all-black."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3:
        if a.shape[2] not in (3, 4):
            raise ValueError(f"expected a gray, RGB or RGBA array, got shape {a.shape}")
        a = a[:, :, :3]
        if a.dtype != np.uint8:
            a = _stretch(a)
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {a.shape}")
    return a if a.dtype == np.uint8 else _stretch(a)


def _stretch(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def mask_stats(array) -> MaskStats:
    """The measures behind is_mask_like_image (for reports and threshold tuning)."""
    gray = _to_gray8(array)
    n = gray.size
    if n == 0:
        raise ValueError("empty image array")
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    near = np.convolve(hist, np.ones(2 * LEVEL_TOLERANCE + 1), mode="same")  # pixels within tol of each level
    p0 = int(np.argmax(near))
    rest = near.copy()
    # The second peak must be a different level, not the shoulder of the first one.
    rest[max(0, p0 - 2 * LEVEL_TOLERANCE):p0 + 2 * LEVEL_TOLERANCE + 1] = 0
    p1 = int(np.argmax(rest))
    levels = np.arange(256)
    in_peaks = (np.abs(levels - p0) <= LEVEL_TOLERANCE) | (np.abs(levels - p1) <= LEVEL_TOLERANCE)
    two_level_share = float(hist[in_peaks].sum() / n)
    few_levels_share = float(np.sort(hist)[-FEW_LEVELS:].sum() / n)
    # Foreground = everything away from the dominant (background) level, eroded so that the
    # anti-aliased rim of a mask region does not count as texture.
    fg = (np.abs(gray.astype(np.int16) - p0) > LEVEL_TOLERANCE).astype(np.uint8)
    inner = cv2.erode(fg, np.ones((5, 5), np.uint8)).astype(bool)
    texture = 0.0
    if inner.sum() >= max(16, n // 1000):
        deviation = cv2.absdiff(gray, cv2.medianBlur(gray, 3))
        texture = float(deviation[inner].mean() / max(float(gray[inner].mean()), 1.0))
    return MaskStats(two_level_share, few_levels_share, texture)


def is_mask_like_image(array) -> bool:
    """True when the pixels look like a segmentation mask: nearly all at two (or a few) levels and
    no speckle texture. An all-one-level image (an empty mask) counts as mask-like."""
    return mask_stats(array).mask_like
