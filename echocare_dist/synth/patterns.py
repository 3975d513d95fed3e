"""Single synthetic frames for tests and benchmarks: simple patterns and a hand-placed fan sector.

`synthetic_image(rng, pattern, width, height)`, the loaders' test images:
  "noise"       smooth random texture;
  "ramp"        gray = RAMP_BASE + RAMP_X x/W + RAMP_Y y/H: the gradient's sign shows flips and its
                span the crop width;
  "ultrasound"  a B-mode still of a random scene from the virtual scanner (scanner.Shot), for
                realistic JPEG sizes (~60-95 KB at 640x480) and decode cost.
`sector_frame(...)` is a speckled fan sector placed in a known box, with optional burned-in text,
for the shard builder's crop tests (the exact sector bounds are returned).
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from .scanner import Shot
from .scenes import SCENES

RAMP_X, RAMP_Y, RAMP_BASE = 150.0, 60.0, 30.0
PATTERNS = ("noise", "ramp", "ultrasound")
MIN_BMODE_SIDE = 48   # below this the scanner's border and sector layout no longer fit
_SCENE_NAMES = tuple(sorted(SCENES))
TEXT = (255, 255, 255)


def synthetic_image(rng: np.random.Generator, pattern: str, width: int, height: int) -> np.ndarray:
    """(height, width) uint8 gray image of `pattern` (one of PATTERNS), drawn from `rng`."""
    if pattern == "ramp":
        x = np.linspace(0, 1, width)[None, :]
        y = np.linspace(0, 1, height)[:, None]
        return np.clip(RAMP_BASE + RAMP_X * x + RAMP_Y * y, 0, 255).astype(np.uint8)
    if pattern == "noise":
        coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
        tissue = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        return np.clip(tissue + rng.normal(0, 12, tissue.shape), 0, 255).astype(np.uint8)
    if pattern == "ultrasound":
        return bmode_still(rng, width, height)
    raise ValueError(f"unknown pattern {pattern!r}: {', '.join(PATTERNS)}")


def bmode_still(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A gray B-mode still of a scene picked by `rng`, with the scanner's burned-in border."""
    if min(width, height) < MIN_BMODE_SIDE:
        raise ValueError(f"the ultrasound pattern needs at least {MIN_BMODE_SIDE} px a side, got {width}x{height}")
    kind = _SCENE_NAMES[int(rng.integers(len(_SCENE_NAMES)))]
    return Shot(kind, height, width, rng).frame().pixels


def fan_mask(h: int, w: int, apex_y: float = -0.15, spread_deg: float = 35.0, r0=0.2, r1=0.95) -> np.ndarray:
    """A convex-probe sector: an annulus wedge with its apex above the top edge."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2, apex_y * h
    r = np.hypot(xx - cx, yy - cy)
    ang = np.degrees(np.arctan2(xx - cx, yy - cy))
    return (np.abs(ang) <= spread_deg) & (r >= r0 * h) & (r <= r1 * h)


def sector_frame(h: int, w: int, seed: int, border_text: bool = True, corner_text: bool = False,
                 box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Gray uint8 B-mode-like frame: speckle inside a sector placed in `box` (x0, y0, x1, y1),
    a brighter ellipse 'organ', and text outside the sector. Returns (image, sector bbox)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box or (w // 6, h // 8, w - w // 6, h - h // 10)
    bh, bw = y1 - y0, x1 - x0
    mask = fan_mask(bh, bw)
    speckle = rng.rayleigh(45 + 10 * (seed % 3), size=(bh, bw))
    organ = np.zeros((bh, bw), np.uint8)
    cv2.ellipse(organ, (int(bw * rng.uniform(.35, .65)), int(bh * rng.uniform(.45, .7))),
                (int(bw * .15), int(bh * .1)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    tissue = np.clip(speckle * (1 + organ * 0.8) + 20, 0, 255).astype(np.uint8)
    region = img[y0:y1, x0:x1]
    region[mask] = tissue[mask]
    ys, xs = np.nonzero(mask)
    sector = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    if border_text:
        cv2.putText(img, "PAT 0042 ABD", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, TEXT, 1)
        cv2.putText(img, f"{seed:03d} 5.0MHz", (3, h - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, TEXT, 1)
        cv2.putText(img, "G 60", (w - 36, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35, TEXT, 1)
    if corner_text:  # inside the sector's bounding box but outside the fan
        cv2.putText(img, "L", (sector[0] + 2, sector[3] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, TEXT, 1)
    return img, sector
