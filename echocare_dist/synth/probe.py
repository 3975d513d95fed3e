"""Transducer footprints and scan conversion.

A B-mode image is formed along scan lines: echoes are computed on a (depth x line) grid and
then scan-converted to the display. Doing the same here gives the real look for free: speckle
elongated along the arcs of a convex probe, lateral resolution falling with depth, sharp fan
edges with a black background around them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# (half opening angle range [rad], inner radius / depth range) of the curved probe families.
_CURVED = {
    "convex": ((0.45, 0.62), (0.35, 0.70)),
    "phased": ((0.60, 0.75), (0.02, 0.05)),
}
PROBE_KINDS = ("linear", "convex", "phased")


@dataclass(frozen=True)
class Probe:
    """A footprint placed on the canvas.

    linear: a rectangle (x0, y0, width, depth); scan lines are vertical.
    convex / phased: a fan with apex (apex_x, apex_y), inner radius r0, radial depth `depth`
    and half opening angle `half_angle`; scan lines are the rays of the fan.
    """
    kind: str
    depth: float
    x0: float = 0.0
    y0: float = 0.0
    width: float = 0.0
    apex_x: float = 0.0
    apex_y: float = 0.0
    r0: float = 0.0
    half_angle: float = 0.0

    # ------------------------------------------------------------------ placement
    @classmethod
    def fit(cls, kind: str, region: tuple[int, int, int, int], rng: np.random.Generator) -> "Probe":
        """The largest footprint of a random shape of `kind` inside region (x0, y0, x1, y1)."""
        rx0, ry0, rx1, ry1 = region
        rw, rh = rx1 - rx0, ry1 - ry0
        if kind == "linear":
            width = rw * rng.uniform(0.72, 1.0)
            depth = rh * rng.uniform(0.85, 1.0)
            return cls("linear", depth=depth, x0=rx0 + (rw - width) / 2, y0=ry0, width=width)
        if kind not in _CURVED:
            raise ValueError(f"unknown probe kind {kind!r}; expected one of {PROBE_KINDS}")
        (a_lo, a_hi), (k_lo, k_hi) = _CURVED[kind]
        theta = rng.uniform(a_lo, a_hi)
        k = rng.uniform(k_lo, k_hi)  # r0 = k * depth
        # Bounding box of the fan: width 2 (r0 + D) sin(theta), height (r0 + D) - r0 cos(theta).
        depth = min(rw / (2 * (k + 1) * math.sin(theta)), rh / (k + 1 - k * math.cos(theta)))
        r0 = k * depth
        return cls(kind, depth=depth, apex_x=rx0 + rw / 2, apex_y=ry0 - r0 * math.cos(theta),
                   r0=r0, half_angle=theta)

    @property
    def curved(self) -> bool:
        return self.kind != "linear"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Integer (x0, y0, x1, y1), exclusive end, that contains the whole footprint."""
        if not self.curved:
            x0, y0, x1, y1 = self.x0, self.y0, self.x0 + self.width, self.y0 + self.depth
        else:
            r1 = self.r0 + self.depth
            half_w = r1 * math.sin(self.half_angle)
            x0, x1 = self.apex_x - half_w, self.apex_x + half_w
            y0, y1 = self.apex_y + self.r0 * math.cos(self.half_angle), self.apex_y + r1
        return math.floor(x0), math.floor(y0), math.ceil(x1) + 1, math.ceil(y1) + 1

    # ------------------------------------------------------------------ scan-line grid
    def grid_shape(self) -> tuple[int, int]:
        """(depth samples, scan lines): about one sample per displayed pixel."""
        n_depth = max(int(round(self.depth)), 8)
        if not self.curved:
            return n_depth, max(int(round(self.width)), 8)
        arc = 2 * self.half_angle * (self.r0 + 0.6 * self.depth)
        return n_depth, max(int(round(arc)), 8)

    def grid_xy(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Canvas coordinates (X, Y) of every sample of the scan-line grid, float32 (Dn, Ln)."""
        n_depth, n_lines = shape
        t = np.linspace(0.0, 1.0, n_depth, dtype=np.float32)[:, None]
        s = np.linspace(0.0, 1.0, n_lines, dtype=np.float32)[None, :]
        if not self.curved:
            X = np.broadcast_to(self.x0 + s * self.width, shape)
            Y = np.broadcast_to(self.y0 + t * self.depth, shape)
            return np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(Y, dtype=np.float32)
        r = self.r0 + t * self.depth
        phi = (s * 2 - 1) * self.half_angle
        return ((self.apex_x + r * np.sin(phi)).astype(np.float32),
                (self.apex_y + r * np.cos(phi)).astype(np.float32))

    def point(self, depth_frac: float, lateral_frac: float) -> tuple[float, float]:
        """Canvas (x, y) of a point given as fraction of depth (0 = skin) and lateral position (-1..1)."""
        if not self.curved:
            return self.x0 + (lateral_frac + 1) / 2 * self.width, self.y0 + depth_frac * self.depth
        r = self.r0 + depth_frac * self.depth
        phi = lateral_frac * self.half_angle
        return self.apex_x + r * math.sin(phi), self.apex_y + r * math.cos(phi)

    def scale(self) -> float:
        """A length that organ sizes are expressed in: the imaging depth in pixels."""
        return self.depth

    # ------------------------------------------------------------------ scan conversion
    def scan_convert(self, lines: np.ndarray, canvas_hw: tuple[int, int]):
        """Resample a (Dn, Ln) uint8 scan-line image onto the canvas footprint.

        Returns (patch, inside, (x0, y0, x1, y1)): the footprint's bounding-box patch (zero
        outside the footprint), the bool footprint over that patch, and the box, clipped to the
        canvas."""
        H, W = canvas_hw
        bx0, by0, bx1, by1 = self.bbox
        bx0, by0, bx1, by1 = max(bx0, 0), max(by0, 0), min(bx1, W), min(by1, H)
        n_depth, n_lines = lines.shape[:2]
        xs = np.arange(bx0, bx1, dtype=np.float32)[None, :]
        ys = np.arange(by0, by1, dtype=np.float32)[:, None]
        if not self.curved:
            map_x = np.broadcast_to((xs - self.x0) / self.width * (n_lines - 1), (len(ys.ravel()), len(xs.ravel())))
            map_y = np.broadcast_to((ys - self.y0) / self.depth * (n_depth - 1), map_x.shape)
        else:
            dx, dy = xs - self.apex_x, ys - self.apex_y
            map_y = (np.hypot(dx, dy) - self.r0) / self.depth * (n_depth - 1)
            map_x = (np.arctan2(dx, dy) / self.half_angle + 1) / 2 * (n_lines - 1)
        map_x = np.ascontiguousarray(map_x, dtype=np.float32)
        map_y = np.ascontiguousarray(map_y, dtype=np.float32)
        inside = (map_x >= 0) & (map_x <= n_lines - 1) & (map_y >= 0) & (map_y <= n_depth - 1)
        patch = cv2.remap(lines, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        patch[~inside] = 0
        return patch, inside, (bx0, by0, bx1, by1)
