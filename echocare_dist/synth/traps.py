"""Frames built to fool a border crop, with the box the crop must find (curation tests).

`trap_frame(kind, seed)` -> (image, content box x0, y0, x1, y1). Kinds:
  "text_band"    a bright filled header band with bold text above a dim, smooth sector (a crop
                 that falls back to "biggest blobs" when nothing looks speckled keeps the band);
  "edge_lesion"  an anechoic lesion reaching both edges of a linear image, splitting off a strip
                 of tissue under 5 % of the main piece's area (a rule that drops pieces by area
                 cuts the lesion out);
  "calipers"     bright caliper crosses and a dotted measurement line on and at the edge of the
                 sector (the same frame without them is its near-duplicate);
  "doppler_box"  an RGB frame: colour-flow blobs inside a Doppler box in the sector and a
                 red-blue velocity bar beside it (the builder converts to gray).
`busi_like(seed)` is a smooth (JPEG-softened) linear frame whose deep part is dark with faint
noise, the texture of the BUSI collection: low speckle contrast, no border at all.
`busi_cropped(seed, gap)` is a frame already cropped to its field of view whose lower third is
dim speckle under the dark threshold (optionally behind a flat shadow band): nothing to crop.
"""
from __future__ import annotations

import cv2
import numpy as np

TRAPS = ("text_band", "edge_lesion", "calipers", "doppler_box")


def _tissue(rng: np.random.Generator, shape: tuple[int, int], scale: float, blur: float = 0.0) -> np.ndarray:
    """Speckle: Rayleigh amplitude with a slowly varying echogenicity, optionally softened."""
    h, w = shape
    coarse = rng.uniform(0.6, 1.4, (h // 24 + 2, w // 24 + 2)).astype(np.float32)
    echo = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    amp = rng.rayleigh(scale, (h, w)).astype(np.float32) * echo
    if blur:
        amp = cv2.GaussianBlur(amp, (0, 0), blur)
    return np.clip(amp, 0, 255)


def _fan(h: int, w: int, spread_deg: float = 38.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2, -0.12 * h
    r = np.hypot(xx - cx, yy - cy)
    ang = np.degrees(np.arctan2(xx - cx, yy - cy))
    return (np.abs(ang) <= spread_deg) & (r >= 0.25 * h) & (r <= 1.1 * h)


def _place_fan(img: np.ndarray, box: tuple[int, int, int, int], tissue: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    fan = _fan(y1 - y0, x1 - x0)
    region = img[y0:y1, x0:x1]
    region[fan] = tissue[fan].astype(img.dtype)
    ys, xs = np.nonzero(fan)
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def trap_frame(kind: str, seed: int = 0, h: int = 320, w: int = 400) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    if kind == "text_band":
        img = np.zeros((h, w), np.uint8)
        band = int(0.15 * h)
        img[:band] = 235
        cv2.putText(img, "ECHOSYN 7  ID 004211  BREAST R", (8, int(band * 0.7)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.7, 0, 2, cv2.LINE_AA)
        box = (w // 10, band + 14, w - w // 10, h - 6)
        tissue = _tissue(rng, (box[3] - box[1], box[2] - box[0]), 24.0, blur=1.4) + 14
        return img, _place_fan(img, box, tissue)
    if kind == "edge_lesion":
        img = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = 20, 16, w - 20, h - 16
        img[y0:y1, x0:x1] = _tissue(rng, (y1 - y0, x1 - x0), 55.0, blur=0.8) + 20
        # Anechoic (below the dark threshold), 40 px wide, spanning top to bottom, 14 px from the
        # right edge: the strip beyond it holds ~4.6 % of the main piece's area.
        cv2.rectangle(img, (x1 - 14 - 40, y0), (x1 - 15, y1 - 1), 3, -1)
        return img, (x0, y0, x1, y1)
    if kind == "calipers":
        img = np.zeros((h, w), np.uint8)
        sector = _place_fan(img, (w // 8, h // 10, w - w // 8, h - 8), _tissue(rng, (h - 8 - h // 10, w - w // 4), 40.0) + 15)
        return img, sector
    if kind == "doppler_box":
        gray = np.zeros((h, w), np.uint8)
        sector = _place_fan(gray, (w // 10, h // 12, w - w // 5, h - 6),
                            _tissue(rng, (h - 6 - h // 12, w - w // 5 - w // 10), 42.0) + 15)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        bx0, by0 = (sector[0] + sector[2]) // 2 - 50, sector[1] + 40
        cv2.rectangle(rgb, (bx0, by0), (bx0 + 100, by0 + 90), (255, 255, 255), 1)
        for i in range(5):  # flow: saturated red (towards) and blue (away) blobs
            c = (230, 30, 20) if i % 2 == 0 else (20, 60, 240)
            cv2.ellipse(rgb, (bx0 + 15 + 18 * i, by0 + 25 + 10 * i), (12, 6), 20 * i, 0, 360, c, -1)
        bar_x = w - w // 10
        t = np.linspace(1, 0, h // 2)[:, None]
        bar = np.concatenate([255 * np.clip(2 * t - 1, 0, 1), 60 * (1 - np.abs(2 * t - 1)),
                              255 * np.clip(1 - 2 * t, 0, 1)], axis=1)
        rgb[h // 4:h // 4 + h // 2, bar_x:bar_x + 18] = bar[:, None, :].astype(np.uint8)
        return rgb, sector
    raise ValueError(f"unknown trap {kind!r}: {', '.join(TRAPS)}")


def draw_calipers(img: np.ndarray, sector: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """A copy of `img` with two caliper crosses (one on the sector's edge) and a dotted line."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    x0, y0, x1, y1 = sector
    a = (int(rng.integers(x0 + 60, (x0 + x1) // 2)), int(rng.integers(y0 + 60, y1 - 60)))
    b = ((x0 + x1) // 2 + 40, y1 - 4)  # on the sector's bottom edge
    for cx, cy in (a, b):
        cv2.line(out, (cx - 7, cy), (cx + 7, cy), 255, 1)
        cv2.line(out, (cx, cy - 7), (cx, cy + 7), 255, 1)
    n = 12
    for i in range(1, n):
        px = a[0] + (b[0] - a[0]) * i // n
        py = a[1] + (b[1] - a[1]) * i // n
        cv2.circle(out, (px, py), 1, 255, -1)
    return out


def busi_like(seed: int = 0, h: int = 420, w: int = 520) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Smooth tissue in the upper 60 %, a dark, faintly noisy depth below (no border): the whole
    frame is the field of view. Returns (image, the box of the tissue a crop must keep)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    depth = int(0.6 * h)
    img[:depth] = _tissue(rng, (depth, w), 60.0, blur=2.0) + 25
    img[depth:] = rng.normal(9, 3, (h - depth, w))
    for _ in range(6):  # faint patches in the depth, just above the dark threshold
        cx, cy = int(rng.integers(40, w - 40)), int(rng.integers(depth + 40, h - 25))
        patch = np.zeros_like(img)
        cv2.ellipse(patch, (cx, cy), (30, 16), 0, 0, 360, 1.0, -1)
        img = np.where(patch > 0, rng.normal(float(rng.uniform(19, 23)), 4, img.shape), img)
    img = np.clip(img + rng.normal(0, 1.5, img.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), (0, 0, w, depth)


def busi_cropped(seed: int = 0, h: int = 300, w: int = 360, gap: bool = False) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A BUSI frame already cropped to its field of view: tissue in the upper two thirds, the
    lower third dim speckle (gray ~3-15, under the dark threshold) running to the frame's bottom
    edge, nowhere true black. With `gap`, a near-flat shadow band at the black level (1) lies
    between the tissue and the dim speckle (as in many BUSI frames). A crop must keep it all:
    returns (image, the whole frame as the box)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    depth = int(2 * h / 3)
    img[:depth] = _tissue(rng, (depth, w), 55.0, blur=1.2) + 25
    deep = _tissue(rng, (h - depth, w), 4.0) + 3
    img[depth:] = np.clip(deep, 3, 15)
    if gap:
        g0, g1 = depth, depth + (h - depth) // 3
        img[g0:g1] = 1 + (rng.random((g1 - g0, w)) < 0.01) * rng.uniform(2, 8, (g1 - g0, w))
    img = np.clip(img, 1, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return np.maximum(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), 1), (0, 0, w, h)
