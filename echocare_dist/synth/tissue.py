"""Tissue maps on the scan-line grid: shapes, textures and the echo properties they carry.

A scene is described by three float32 maps over the (depth x line) grid:
  reflectivity  mean echo amplitude (tissue ~0.5, fluid ~0.01, bone/stone interface 2-4);
  attenuation   extra attenuation per sample relative to soft tissue (fluid < 0 gives posterior
                enhancement, calcification / bone >> 0 gives an acoustic shadow);
and shapes are evaluated at the canvas coordinates of the grid samples, so they keep their
geometry after scan conversion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class Blob:
    """An ellipse whose boundary is perturbed by a few angular harmonics (lobulated or spiculated)."""
    cx: float
    cy: float
    ax: float  # semi-axes in pixels, before rotation
    ay: float
    angle: float = 0.0  # radians
    harmonics: tuple = ()  # ((k, amplitude, phase), ...)
    edge: float = 1.5  # soft edge width in pixels

    @classmethod
    def random(cls, rng: np.random.Generator, cx: float, cy: float, ax: float, ay: float,
               irregularity: float = 0.0, angle: float | None = None, edge: float = 1.5) -> "Blob":
        harmonics = ()
        if irregularity > 0:
            ks = (2, 3, 4, 5, 7, 9)
            harmonics = tuple((k, float(irregularity * rng.uniform(0.3, 1.0) / math.sqrt(k)),
                               float(rng.uniform(0, 2 * math.pi))) for k in ks)
        if angle is None:
            angle = float(rng.uniform(-0.4, 0.4))
        return cls(float(cx), float(cy), float(max(ax, 1.0)), float(max(ay, 1.0)), angle, harmonics, edge)

    def rho(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Normalized radius: < 1 inside, 1 on the boundary."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = X - self.cx, Y - self.cy
        u = (c * dx + s * dy) / self.ax
        v = (-s * dx + c * dy) / self.ay
        r = np.sqrt(u * u + v * v)
        if not self.harmonics:
            return r
        t = np.arctan2(v, u)
        boundary = np.ones_like(r)
        for k, amp, phase in self.harmonics:
            boundary += amp * np.cos(k * t + phase)
        return r / np.maximum(boundary, 0.3)

    def window(self, X: np.ndarray, Y: np.ndarray, pad: float) -> tuple[slice, slice] | None:
        """The grid rows/cols whose samples can lie within `pad` pixels of the blob (speed-up)."""
        reach = max(self.ax, self.ay) * (1 + sum(a for _, a, _ in self.harmonics)) + pad
        near = (np.abs(X - self.cx) <= reach) & (np.abs(Y - self.cy) <= reach)
        rows, cols = np.any(near, axis=1), np.any(near, axis=0)
        if not rows.any():
            return None
        r = np.flatnonzero(rows)
        c = np.flatnonzero(cols)
        return slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1)

    def soft(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """1 inside, 0 outside, a linear ramp `edge` pixels wide across the boundary."""
        scale = min(self.ax, self.ay)
        return np.clip((1.0 - self.rho(X, Y)) * scale / self.edge + 0.5, 0.0, 1.0)

    def ring(self, X: np.ndarray, Y: np.ndarray, width: float) -> np.ndarray:
        """A band of about `width` pixels on the boundary (capsule, wall, skull)."""
        scale = min(self.ax, self.ay)
        d = (self.rho(X, Y) - 1.0) * scale / max(width / 2, 0.5)
        return np.exp(-d * d)

    def scaled(self, f: float) -> "Blob":
        return Blob(self.cx, self.cy, self.ax * f, self.ay * f, self.angle, self.harmonics, self.edge)


@dataclass
class TissueMaps:
    """What a scene hands to the beamformer-like renderer."""
    X: np.ndarray
    Y: np.ndarray
    depth: np.ndarray  # (Dn, 1) depth fraction 0..1
    reflectivity: np.ndarray = field(default=None)
    attenuation: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.reflectivity is None:
            self.reflectivity = np.zeros(self.X.shape, np.float32)
        if self.attenuation is None:
            self.attenuation = np.zeros(self.X.shape, np.float32)

    # Each painter works on the blob's window of the grid only: most shapes are small.
    def paint(self, blob: Blob, level: float, attenuation: float | None = None,
              texture: np.ndarray | None = None) -> None:
        """Replace the tissue inside `blob` by echo `level` (optionally textured) and attenuation."""
        win = blob.window(self.X, self.Y, pad=blob.edge * 2)
        if win is None:
            return
        m = blob.soft(self.X[win], self.Y[win])
        value = level if texture is None else level * texture[win]
        refl = self.reflectivity[win]
        refl += m * (value - refl)
        if attenuation is not None:
            att = self.attenuation[win]
            att += m * (attenuation - att)

    def ring(self, blob: Blob, level: float, width: float, attenuation: float = 0.0) -> None:
        """Add a bright boundary (wall, capsule, skull) on top of what is there."""
        win = blob.window(self.X, self.Y, pad=width * 2)
        if win is None:
            return
        band = blob.ring(self.X[win], self.Y[win], width)
        self.reflectivity[win] += level * band
        if attenuation:
            self.attenuation[win] += attenuation * band

    def line(self, p0: tuple[float, float], p1: tuple[float, float], level: float, width: float,
             attenuation: float = 0.0) -> None:
        """A bright straight segment (fascia, valve leaflet, needle-like interface)."""
        x0, y0 = p0
        x1, y1 = p1
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-6)
        t = np.clip(((self.X - x0) * dx + (self.Y - y0) * dy) / length2, 0.0, 1.0)
        d2 = (self.X - (x0 + t * dx)) ** 2 + (self.Y - (y0 + t * dy)) ** 2
        band = np.exp(-d2 / max(width / 2, 0.5) ** 2)
        self.reflectivity += level * band
        if attenuation:
            self.attenuation += attenuation * band

    def depth_band(self, d0: float, d1: float, level: float, mix: float = 1.0,
                   texture: np.ndarray | None = None) -> None:
        """Replace the tissue between depth fractions d0 and d1 (skin, fat, muscle layers)."""
        m = np.clip(np.minimum(self.depth - d0, d1 - self.depth) * 200.0, 0.0, 1.0) * mix
        value = level if texture is None else level * texture
        self.reflectivity += m * (value - self.reflectivity)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int],
                 contrast: float) -> np.ndarray:
    """Multiplicative low-frequency texture 1 + contrast * N(0, 1)-ish, float32, > 0."""
    coarse = rng.standard_normal((cells[0] + 1, cells[1] + 1)).astype(np.float32)
    up = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(1.0 + contrast * up, 0.15, None).astype(np.float32)


def scatterer_texture(rng: np.random.Generator, shape: tuple[int, int], density: float,
                      strength: float) -> np.ndarray:
    """Sparse bright point scatterers (vessel walls, fibrous septa): 1 + strength at a few samples."""
    out = np.ones(shape, np.float32)
    n = int(density * shape[0] * shape[1])
    if n:
        idx = rng.integers(0, shape[0] * shape[1], size=n)
        out.reshape(-1)[idx] += strength * rng.uniform(0.5, 1.0, size=n).astype(np.float32)
    return out
