"""Per-frame curation: crop the burned-in border, reject near-empty frames, hash, downscale,
perceptual hash, JPEG re-encode.

Crop. Scanner exports put patient data, depth scales and logos around the ultrasound sector.
The sector is the one big bright blob; glyphs are small blobs separated from it by black. So:
box-blur (merges speckle into a solid region), threshold at `dark_threshold`, morphological
opening (cuts thin scale ticks and strokes), connected components; keep components with at least
`component_fraction` of the largest one's area (so a dual-view image keeps both views), crop to
their bounding box plus `margin`, and optionally blank what lies inside the box but outside
the kept content (text in the corners next to a convex sector).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from ..config import CurationConfig


@dataclass(frozen=True)
class FrameParams:
    dark_threshold: int
    crop_margin: int
    component_fraction: float
    min_feature: float
    min_texture: float
    blank_outside: bool
    min_nonzero: int
    max_side: int
    jpeg_quality: int

    @classmethod
    def from_config(cls, c: CurationConfig) -> "FrameParams":
        return cls(c.dark_threshold, c.crop_margin, c.crop_component_fraction, c.crop_min_feature,
                   c.crop_min_texture, c.crop_blank_outside, c.min_nonzero, c.max_side, c.jpeg_quality)


@dataclass
class Frame:
    """A curated frame ready for the shard."""
    key: str                  # 16 hex chars: hash of the cropped pixels (dedupe identity)
    phash: int                # 64-bit DCT perceptual hash
    jpeg: bytes
    width: int                # of the stored image
    height: int
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in the decoded frame


class Rejected(Exception):
    """A frame that decoded fine but is not worth training on (reason is a manifest key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _odd(n: float) -> int:
    return max(3, int(round(n)) | 1)


def content_mask(gray: np.ndarray, p: FrameParams) -> tuple[tuple[int, int, int, int] | None, np.ndarray | None]:
    """(x0, y0, x1, y1) of the main content (with margin) and a uint8 mask of where it lies
    (None when blanking is off), or (None, None) when nothing is brighter than the threshold."""
    h, w = gray.shape
    short = min(h, w)
    # Median: speckle becomes a solid region while strokes a few pixels wide (text) vanish.
    smooth = cv2.medianBlur(gray, _odd(short * 0.01))
    fg = (smooth > p.dark_threshold).astype(np.uint8)
    # Opening with a kernel of `min_feature` of the short side keeps only what is thick in both
    # directions: the sector (or its pieces, when fluid splits it) but not text lines, scale
    # bars, tick marks, logos or ECG traces.
    k = _odd(short * p.min_feature)
    cores = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    n, core_labels, stats, _ = cv2.connectedComponentsWithStats(cores, connectivity=8)
    if n <= 1:
        return None, None
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    # Graphics are flat (logos, grey-scale bars, filled labels); B-mode content always carries
    # speckle, a multiplicative noise. Speckle contrast = mean |pixel - its 3x3 median| / mean
    # level over the component's interior (its rim would count JPEG ringing at graphic edges):
    # ~0.01 for graphics even after JPEG, >= 0.03 for B-mode, dim or bright.
    inner_labels = core_labels * cv2.erode(cores, np.ones((5, 5), np.uint8))
    has_interior = np.bincount(inner_labels.ravel(), minlength=n) > 0
    region = np.where(has_interior[core_labels], inner_labels, core_labels)  # too thin: use all of it
    deviation = cv2.absdiff(gray, cv2.medianBlur(gray, 3))
    dev_sum = np.bincount(region.ravel(), weights=deviation.ravel(), minlength=n)[1:]
    level_sum = np.bincount(region.ravel(), weights=gray.ravel(), minlength=n)[1:]
    texture = dev_sum / np.maximum(level_sum, 1.0)
    candidates = texture >= p.min_texture
    if not candidates.any():  # nothing textured (e.g. a heavily smoothed export): judge by size only
        candidates[:] = True
    largest = areas[candidates].max()
    keep_cores = 1 + np.flatnonzero(candidates & (areas >= p.component_fraction * largest))
    # Grow the kept cores back to their full connected extent in `fg` (morphological
    # reconstruction): thin parts attached to the content (a sector's apex, a needle) return,
    # detached overlays do not.
    n_fg, fg_labels = cv2.connectedComponents(fg, connectivity=8)
    core_kept = np.zeros(n, dtype=bool)
    core_kept[keep_cores] = True
    fg_kept = np.bincount(fg_labels[core_kept[core_labels]], minlength=n_fg) > 0
    fg_kept[0] = False
    content = fg_kept.astype(np.uint8)[fg_labels]
    x, y, bw, bh = cv2.boundingRect(content)
    m = p.crop_margin
    box = (max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m))
    if not p.blank_outside:
        return box, None
    # Blank outside the convex hull of the content: the fan and whatever lies between its
    # pieces (dark fluid) stay, glyphs in the box's corners beside a convex sector go.
    contours, _ = cv2.findContours(content, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    mask = np.zeros_like(content)
    cv2.fillConvexPoly(mask, hull, 1)
    if m:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * m + 1, 2 * m + 1)))
    return box, mask


def crop_content(gray: np.ndarray, p: FrameParams) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The cropped (and optionally blanked) frame and its box; raises Rejected when nothing is left."""
    box, mask = content_mask(gray, p)
    if box is None:
        raise Rejected("too_few_pixels", "no content above curation.dark_threshold")
    x0, y0, x1, y1 = box
    out = np.ascontiguousarray(gray[y0:y1, x0:x1])
    if mask is not None:
        out = np.where(mask[y0:y1, x0:x1].astype(bool), out, np.uint8(0))
    return out, box


def pixel_key(img: np.ndarray) -> str:
    """16 hex chars of a BLAKE2b digest of the shape and pixels (64 bits: at 5 M images the chance
    of any collision is ~1e-6, and a collision only drops one image as a 'duplicate')."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(img.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def phash64(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the classic pHash: 32x32 area resize, 2-D DCT, the 8x8 lowest
    frequencies against their median)."""
    small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape
    if max_side <= 0 or max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """Baseline 8-bit single-channel JPEG (what nvJPEG and DALI's CPU decoder both take)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {img.shape}")
    return buf.tobytes()


def curate_frame(gray: np.ndarray, p: FrameParams) -> Frame:
    """decoded uint8 gray frame -> Frame, or raises Rejected."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 frame, got {gray.dtype} {gray.shape}")
    cropped, box = crop_content(gray, p)
    nonzero = cv2.countNonZero(cropped)
    if nonzero < p.min_nonzero:
        raise Rejected("too_few_pixels", f"{nonzero} non-zero pixels < curation.min_nonzero={p.min_nonzero}")
    key = pixel_key(cropped)
    small = downscale(cropped, p.max_side)
    return Frame(key=key, phash=phash64(small), jpeg=encode_jpeg(small, p.jpeg_quality),
                 width=int(small.shape[1]), height=int(small.shape[0]), crop=box)
