"""Per-frame curation: crop the burned-in border, reject near-empty frames, hash, downscale,
perceptual hash, JPEG re-encode.

Crop: fov.py finds the ultrasound field of view (or rejects the frame as `crop_failed`); what
lies inside its box but outside the content hull can be blanked (text in the corners next to a
convex sector).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from ..config import CurationConfig
from .burnedin import blank_boxes, find_text_boxes
from .fov import FovParams, detect_fov


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
    max_discard: float = 0.05
    min_content: float = 0.01
    max_pixels: int = 0          # checked by the decoders (media.py) from the header; 0 = no cap
    burned_in_text: str = "off"  # curation.burned_in_text: off | flag | blank (burnedin.py)

    @classmethod
    def from_config(cls, c: CurationConfig) -> "FrameParams":
        return cls(c.dark_threshold, c.crop_margin, c.crop_component_fraction, c.crop_min_feature,
                   c.crop_min_texture, c.crop_blank_outside, c.min_nonzero, c.max_side, c.jpeg_quality,
                   c.crop_max_discard, c.crop_min_content, max_pixels=c.max_pixels,
                   burned_in_text=c.burned_in_text)

    def fov(self) -> FovParams:
        return FovParams(self.dark_threshold, self.crop_margin, self.min_feature, self.min_texture,
                         self.component_fraction, self.max_discard, self.min_content, self.blank_outside,
                         self.min_nonzero)


@dataclass
class Frame:
    """A curated frame ready for the shard."""
    key: str                  # 16 hex chars: hash of the cropped pixels (dedupe identity)
    phash: int                # 64-bit DCT perceptual hash
    jpeg: bytes
    width: int                # of the stored image
    height: int
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in the decoded frame
    discarded: float = 0.0    # share of the frame's textured content outside the crop (audit)
    text_boxes: tuple = ()    # burned-in text found inside the crop, (x0, y0, x1, y1) in the decoded frame


class Rejected(Exception):
    """A frame that decoded fine but is not worth training on (reason is a manifest key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def crop_content(gray: np.ndarray, p: FrameParams) -> tuple[np.ndarray, tuple[int, int, int, int], float]:
    """The cropped (and optionally blanked) frame, its box and the share of textured content it
    leaves out; raises Rejected (`crop_failed`, `too_few_pixels`) when no sound box exists."""
    fov = detect_fov(gray, p.fov())
    if fov.failure:
        raise Rejected(fov.reason, fov.failure)
    x0, y0, x1, y1 = fov.box
    out = np.ascontiguousarray(gray[y0:y1, x0:x1])
    if fov.mask is not None:
        out = np.where(fov.mask[y0:y1, x0:x1].astype(bool), out, np.uint8(0))
    return out, fov.box, fov.discarded


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
    cropped, box, discarded = crop_content(gray, p)
    text = find_text_boxes(cropped) if p.burned_in_text != "off" else []
    if text and p.burned_in_text == "blank":
        cropped = blank_boxes(cropped, text)  # before hashing: a blanked copy dedupes like its twin
    nonzero = cv2.countNonZero(cropped)
    if nonzero < p.min_nonzero:
        raise Rejected("too_few_pixels", f"{nonzero} non-zero pixels < curation.min_nonzero={p.min_nonzero}")
    key = pixel_key(cropped)
    small = downscale(cropped, p.max_side)
    return Frame(key=key, phash=phash64(small), jpeg=encode_jpeg(small, p.jpeg_quality),
                 width=int(small.shape[1]), height=int(small.shape[0]), crop=box, discarded=discarded,
                 text_boxes=tuple((x0 + box[0], y0 + box[1], x1 + box[0], y1 + box[1]) for x0, y0, x1, y1 in text))
