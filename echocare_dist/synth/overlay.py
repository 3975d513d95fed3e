"""The burned-in border of a scanner screenshot: text, gray/colour bar, logo, depth ticks, ECG.

Everything here is drawn in bands around the sector region, at least `gap` pixels away from
it, so a crop to the bounding box of the main (sector) content removes it, which is what the
shard builder must do with real exports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_VENDORS = ("ECHOSYN 7", "SONOGEN X5", "ULTRAMOCK 3", "PROBEWORKS E9")
_PROBES = {"linear": ("L12-5", "L15-7", "L9-3"), "convex": ("C5-1", "C6-2", "C4-1"), "phased": ("S5-1", "P4-2")}


@dataclass(frozen=True)
class Layout:
    """Bands (in pixels) of a canvas H x W; the sector goes in `sector_region`."""
    height: int
    width: int
    top: int
    left: int
    right: int
    bottom: int
    gap: int
    left_column: bool  # a column of acquisition parameters on the left
    ecg: bool          # an ECG trace in the bottom band

    @classmethod
    def random(cls, rng: np.random.Generator, height: int, width: int, ecg: bool = False) -> "Layout":
        left_column = bool(rng.random() < 0.4) and width >= 1.2 * height
        top = int(np.clip(round(0.11 * height), 16, 44))
        left = int(np.clip(round(0.15 * width), 34, 90)) if left_column else int(np.clip(round(0.03 * width), 3, 16))
        right = int(np.clip(round(0.08 * width), 14, 40))
        bottom = int(np.clip(round(0.12 * height), 18, 50)) if ecg else int(np.clip(round(0.03 * height), 3, 14))
        return cls(height, width, top, left, right, bottom, gap=6, left_column=left_column, ecg=ecg)

    @property
    def sector_region(self) -> tuple[int, int, int, int]:
        g = self.gap
        return (self.left + g, self.top + g, self.width - self.right - g, self.height - self.bottom - g // 2)


def _color(rgb: bool, rng: np.random.Generator, gray: int):
    if not rgb:
        return gray
    palette = ((255, 255, 255), (255, 230, 0), (0, 230, 255), (120, 255, 120))
    return palette[int(rng.integers(len(palette)))]


def _put(canvas: np.ndarray, text: str, org: tuple[int, int], max_w: int, max_h: int, color) -> None:
    """Text scaled to fit max_w x max_h (small screens get small print, as on scanners)."""
    (w, h), _ = cv2.getTextSize(text, _FONT, 1.0, 1)
    scale = max(min(max_w / max(w, 1), max_h / max(h, 1), 0.9), 0.2)
    cv2.putText(canvas, text, org, _FONT, scale, color, 1, cv2.LINE_AA)


def acquisition_text(rng: np.random.Generator, probe_kind: str, depth_cm: float, gain_db: float) -> list[str]:
    vendor = _VENDORS[int(rng.integers(len(_VENDORS)))]
    probe = _PROBES[probe_kind][int(rng.integers(len(_PROBES[probe_kind])))]
    y, mo, d = 2015 + int(rng.integers(10)), 1 + int(rng.integers(12)), 1 + int(rng.integers(28))
    hh, mm = int(rng.integers(7, 19)), int(rng.integers(60))
    return [f"{vendor}  {probe}  ID {int(rng.integers(10**6)):06d}",
            f"{y}/{mo:02d}/{d:02d} {hh:02d}:{mm:02d}  D{depth_cm:.1f}cm G{50 + gain_db:.0f} "
            f"MI {rng.uniform(0.4, 1.4):.1f} TIS {rng.uniform(0.1, 0.9):.1f}"]


def burn_in(canvas: np.ndarray, layout: Layout, rng: np.random.Generator, lines: list[str],
            sector_box: tuple[int, int, int, int], depth_cm: float, rgb: bool, ecg_phase: float = 0.0) -> None:
    """Draw the border in place on a (H, W) gray or (H, W, 3) RGB uint8 canvas."""
    H, W = layout.height, layout.width
    color = _color(rgb, rng, int(rng.integers(200, 256)))
    # Top band: one or two lines of text, kept clear of the logo box on the right.
    logo = max(layout.top - 6, 10)
    n = len(lines)
    row_h = (layout.top - 4) // n
    for i, text in enumerate(lines):
        _put(canvas, text, (layout.left + 2, 2 + row_h * (i + 1) - 2), W - layout.left - logo - 16, row_h - 3, color)
    lx0 = W - logo - 4
    cv2.rectangle(canvas, (lx0, 2), (lx0 + logo, 2 + logo), color, 1)
    cv2.circle(canvas, (lx0 + logo // 2, 2 + logo // 2), max(logo // 4, 2), color, -1)

    if layout.left_column:  # parameter column
        params = [f"FR {rng.integers(12, 60)}", f"G {rng.integers(30, 80)}", f"DR {rng.integers(50, 80)}",
                  f"AO {rng.integers(60, 101)}%", f"PRC {rng.integers(1, 4)}/{rng.integers(0, 3)}"]
        y0, step = layout.top + layout.gap + 12, max(14, (H - layout.top - layout.bottom) // 12)
        for i, text in enumerate(params):
            _put(canvas, text, (3, y0 + i * step), layout.left - 8, step - 4, color)

    # Right band: gray (or colour-Doppler) scale bar and depth ticks every centimetre.
    bx0 = W - layout.right + 3
    bw = max(4, layout.right // 3)
    by0 = layout.top + layout.gap
    by1 = by0 + max(int(0.35 * H), 20)
    ramp = np.linspace(255, 0, by1 - by0, dtype=np.float32)[:, None]
    if rgb and rng.random() < 0.5:
        t = ramp / 255.0  # red (towards) to blue (away) velocity scale
        bar = np.concatenate([255 * np.clip(2 * t - 1, 0, 1), 80 * (1 - np.abs(2 * t - 1)),
                              255 * np.clip(1 - 2 * t, 0, 1)], axis=1)[:, None, :]
        canvas[by0:by1, bx0:bx0 + bw] = np.broadcast_to(bar, (by1 - by0, bw, 3)).astype(np.uint8)
    else:
        bar = np.broadcast_to(ramp, (by1 - by0, bw))
        if canvas.ndim == 3:
            bar = bar[..., None]
        canvas[by0:by1, bx0:bx0 + bw] = bar.astype(np.uint8)
    _, sy0, _, sy1 = sector_box
    px_per_cm = (sy1 - sy0) / max(depth_cm, 0.5)
    tx = bx0 + bw + 3
    if tx + 2 < W:
        for k in range(int(depth_cm) + 1):
            y = int(round(sy0 + k * px_per_cm))
            if y < H - layout.bottom:
                cv2.rectangle(canvas, (tx, y), (min(tx + 2 + (k % 5 == 0) * 2, W - 1), y + 1), color, -1)

    if layout.ecg:  # a sweeping ECG trace, as on cardiac clips
        ecg_color = (90, 255, 90) if rgb else 180
        ys0, ys1 = H - layout.bottom + 3, H - 3
        mid, amp = (ys0 + ys1) / 2, (ys1 - ys0) / 2
        xs = np.arange(layout.left, W - layout.right)
        t = (xs - layout.left) / max(len(xs), 1) * 2.5 + ecg_phase
        beat = np.mod(t, 1.0)
        wave = (np.exp(-((beat - 0.3) / 0.015) ** 2) - 0.25 * np.exp(-((beat - 0.34) / 0.02) ** 2)
                + 0.2 * np.exp(-((beat - 0.55) / 0.05) ** 2) + 0.1 * np.exp(-((beat - 0.12) / 0.03) ** 2))
        pts = np.stack([xs, mid - amp * 0.9 * wave], axis=1).round().astype(np.int32)
        cv2.polylines(canvas, [pts], False, ecg_color, 1, cv2.LINE_AA)
        sweep = layout.left + int(math.fmod(ecg_phase, 1.0) * len(xs))
        cv2.line(canvas, (sweep, ys0), (sweep, ys1), color, 1)
