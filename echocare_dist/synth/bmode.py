"""B-mode formation: tissue maps -> echo envelope -> log compression -> scan conversion.

    envelope = reflectivity * speckle * exp(-cumulative attenuation) * time-gain + noise floor
    gray     = 255 * (20 log10(envelope) - (top - DR)) / DR, clipped

Speckle is fully developed: a complex Gaussian field blurred by an anisotropic point-spread
function (short axially, wider laterally) whose magnitude is Rayleigh distributed. The
attenuation is accumulated along each scan line, so fluid gives posterior enhancement and
stones, bone and calcifications cast shadows. Time-gain compensation only partly undoes the
depth attenuation, as on a real scanner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .probe import Probe
from .scenes import paint_scene
from .tissue import Blob, TissueMaps


@dataclass(frozen=True)
class Acquisition:
    """Scanner settings of one image (or of every frame of one clip)."""
    attenuation: float      # amplitude attenuation over the full depth, nepers (round trip)
    tgc: float              # share of it the time-gain curve compensates
    focus: float            # focal depth fraction (slightly brighter band)
    gain_db: float
    dynamic_range_db: float
    psf_axial: float        # speckle grain, in scan-line samples
    psf_lateral: float
    noise_floor: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Acquisition":
        return cls(attenuation=rng.uniform(1.6, 2.8), tgc=rng.uniform(0.55, 0.9), focus=rng.uniform(0.3, 0.6),
                   gain_db=rng.uniform(-3.0, 3.0), dynamic_range_db=rng.uniform(50.0, 62.0),
                   psf_axial=rng.uniform(0.7, 1.1), psf_lateral=rng.uniform(1.3, 2.3),
                   noise_floor=rng.uniform(0.003, 0.008))


class Speckle:
    """The complex scatterer field of one acquisition; `advance` decorrelates it between frames."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int]):
        self.shape = shape
        self.re = rng.standard_normal(shape, dtype=np.float32)
        self.im = rng.standard_normal(shape, dtype=np.float32)

    def advance(self, rng: np.random.Generator, correlation: float) -> None:
        keep, fresh = np.float32(correlation), np.float32(math.sqrt(1.0 - correlation ** 2))
        self.re = keep * self.re + fresh * rng.standard_normal(self.shape, dtype=np.float32)
        self.im = keep * self.im + fresh * rng.standard_normal(self.shape, dtype=np.float32)

    def envelope(self, acq: Acquisition) -> np.ndarray:
        blur = dict(ksize=(0, 0), sigmaX=acq.psf_lateral, sigmaY=acq.psf_axial, borderType=cv2.BORDER_REFLECT)
        env = cv2.magnitude(cv2.GaussianBlur(self.re, **blur), cv2.GaussianBlur(self.im, **blur))
        return env * np.float32(1.0 / math.sqrt(float(np.mean(env * env)) + 1e-12))


def render_lines(kind: str, layout_seed: tuple, probe: Probe, acq: Acquisition, speckle: Speckle,
                 noise_rng: np.random.Generator, phase: float = 0.0) -> tuple[np.ndarray, list[Blob]]:
    """The scan-line image (Dn, Ln) uint8 of scene `kind`, and the shapes a mask would outline."""
    shape = speckle.shape
    X, Y = probe.grid_xy(shape)
    depth = np.linspace(0.0, 1.0, shape[0], dtype=np.float32)[:, None]
    maps = TissueMaps(X, Y, depth)
    lesions = paint_scene(kind, np.random.default_rng(list(layout_seed)), maps, probe, phase)

    per_sample = np.float32(acq.attenuation / shape[0])
    k = per_sample * np.maximum(1.0 + maps.attenuation, 0.02)
    # Exclusive cumulative sum: a reflector is not shadowed by itself, only what lies behind it.
    transmitted = np.exp(-(np.cumsum(k, axis=0) - k))
    tgc = np.exp(acq.attenuation * acq.tgc * depth) * (1.0 + 0.2 * np.exp(-((depth - acq.focus) / 0.12) ** 2))
    env = maps.reflectivity * speckle.envelope(acq) * transmitted * tgc
    env += acq.noise_floor * noise_rng.rayleigh(size=shape).astype(np.float32)
    db = 20.0 * np.log10(env + 1e-6)
    top = 25.0 + acq.gain_db  # soft tissue (reflectivity ~0.5) lands near gray 100
    gray = (db - (top - acq.dynamic_range_db)) * (255.0 / acq.dynamic_range_db)
    return np.clip(gray, 0, 255).astype(np.uint8), lesions


def lesion_mask(lesions: list[Blob], canvas_hw: tuple[int, int], footprint: np.ndarray,
                bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Binary uint8 (0/255) canvas mask of the lesions, limited to the imaged footprint."""
    H, W = canvas_hw
    mask = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = bbox
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    inside = np.zeros(ys.shape, bool)
    for blob in lesions:
        inside |= blob.rho(xs, ys) < 1.0
    mask[y0:y1, x0:x1] = np.where(inside & footprint, 255, 0).astype(np.uint8)
    return mask
