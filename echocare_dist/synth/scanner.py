"""One acquisition on a virtual scanner: layout, probe, settings and scene fixed; frames rendered on demand.

A still image is frame 0 of a shot; a clip renders frames at increasing phase with a slowly
decorrelating speckle field and the same border (except the ECG sweep), like a cine loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .bmode import Acquisition, Speckle, lesion_mask, render_lines
from .overlay import Layout, acquisition_text, burn_in
from .probe import Probe
from .scenes import default_probe

_DEPTH_CM = {"linear": (3.0, 6.0), "convex": (12.0, 20.0), "phased": (14.0, 18.0)}
# RGB exports are gray images in three channels, often with a vendor tint.
_TINTS = {"gray": (1.0, 1.0, 1.0), "sepia": (1.0, 0.92, 0.78), "blue": (0.82, 0.92, 1.0)}


@dataclass
class Frame:
    pixels: np.ndarray                       # (H, W) uint8 gray or (H, W, 3) uint8 RGB
    sector_box: tuple[int, int, int, int]    # x0, y0, x1, y1 (exclusive) of the imaged footprint
    mask: np.ndarray | None = None           # (H, W) uint8 0/255 lesion mask, when asked for


class Shot:
    def __init__(self, kind: str, height: int, width: int, rng: np.random.Generator, *, rgb: bool = False,
                 ecg: bool = False):
        self.kind = kind
        self.hw = (height, width)
        self.rgb = rgb
        self.layout = Layout.random(rng, height, width, ecg=ecg)
        self.probe = Probe.fit(default_probe(kind), self.layout.sector_region, rng)
        self.acq = Acquisition.random(rng)
        self.depth_cm = float(rng.uniform(*_DEPTH_CM[self.probe.kind]))
        self.text = acquisition_text(rng, self.probe.kind, self.depth_cm, self.acq.gain_db)
        self.tint = _TINTS[("gray", "sepia", "blue")[int(rng.integers(3))]] if rgb else None
        self.color_flow = rgb and kind.startswith("carotid") and bool(rng.random() < 0.7)
        self.layout_seed = tuple(int(x) for x in rng.integers(0, 2**32, size=2))
        self.overlay_seed = int(rng.integers(0, 2**32))
        self.speckle = Speckle(rng, self.probe.grid_shape())
        self.noise_rng = np.random.default_rng(int(rng.integers(0, 2**63)))

    def frame(self, phase: float = 0.0, with_mask: bool = False) -> Frame:
        lines, lesions = render_lines(self.kind, self.layout_seed, self.probe, self.acq, self.speckle,
                                      self.noise_rng, phase)
        patch, inside, box = self.probe.scan_convert(lines, self.hw)
        x0, y0, x1, y1 = box
        gray = np.zeros(self.hw, np.uint8)
        gray[y0:y1, x0:x1] = patch
        mask = lesion_mask(lesions, self.hw, inside, box) if (with_mask or self.color_flow) else None
        if self.rgb:
            canvas = np.clip(gray[..., None] * np.asarray(self.tint, np.float32), 0, 255).astype(np.uint8)
            if self.color_flow:
                self._paint_flow(canvas, mask, box, phase)
        else:
            canvas = gray
        burn_in(canvas, self.layout, np.random.default_rng(self.overlay_seed), self.text, box, self.depth_cm,
                self.rgb, ecg_phase=phase)
        return Frame(canvas, box, mask if with_mask else None)

    def _paint_flow(self, canvas: np.ndarray, lumen: np.ndarray, box, phase: float) -> None:
        """Colour Doppler: a gray ROI box inside the sector and red/blue flow in the vessel lumen."""
        rng = np.random.default_rng(self.overlay_seed + 1)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        rx0 = x0 + int(w * rng.uniform(0.15, 0.35))
        rx1 = rx0 + int(w * rng.uniform(0.3, 0.45))
        ry0, ry1 = y0 + int(h * 0.2), y0 + int(h * 0.85)
        roi = np.zeros(lumen.shape, bool)
        roi[ry0:ry1, rx0:rx1] = True
        flow = (lumen > 0) & roi
        hue = np.array([220, 40, 30] if rng.random() < 0.6 else [30, 60, 220], np.float32)
        # velocity varies along the vessel and over the cardiac cycle; mottled like real flow maps
        texture = 0.55 + 0.45 * cv2.GaussianBlur(rng.random(lumen.shape, dtype=np.float32), (0, 0), 2.0)[flow] \
            * (0.7 + 0.3 * np.sin(2 * np.pi * phase))
        canvas[flow] = np.clip(texture[:, None] * hue * 1.3, 0, 255).astype(np.uint8)
        canvas[ry0, rx0:rx1] = canvas[ry1 - 1, rx0:rx1] = 160
        canvas[ry0:ry1, rx0] = canvas[ry0:ry1, rx1 - 1] = 160
