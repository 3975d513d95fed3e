"""Annotated synthetic sets for the fine-tuning tasks that need more than a class or a mask:
landmarks, detection boxes and low/high quality pairs, all taken from the breast scenes the
generator already draws (their lesion masks are exact, so the annotations are too).

`generate_task_sets(out_dir, num_images, seed)` writes
  landmarks/images/*.png + landmarks.csv   path,top_x,top_y,bottom_x,bottom_y,left_x,left_y,right_x,right_y,spacing:
                                           the extreme points of the largest lesion (pixel centres),
                                           spacing = imaged depth / image height in mm per pixel
  detection/images/*.png + boxes.csv       path,x1,y1,x2,y2,label,mask: one box per lesion (connected
                                           component, pixel edges); normal scans appear with empty cells;
  detection/masks/*.png                    mask = the kept lesions (0/255): each box's instance mask
  enhancement/high/*.png, low/*.png        the same scan as rendered, and blurred + extra speckle
`echocare synth --tasks N` writes them under OUT/tasks/. Image sizes vary (not square) so the
resizing to the training size is exercised.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_write_text
from .scanner import Shot
from .writers import write_image

LESION_SCENES = ("breast_mass", "breast_cyst", "breast_mass_cyst")
NORMAL_SHARE = 0.15          # detection: scans without a lesion (false positives must cost AP)
MIN_LESION_PIXELS = 12
LOW_BLUR_SIGMA, LOW_LOOKS = 1.5, 3.0
POINTS = ("top", "bottom", "left", "right")


def extreme_points(component: np.ndarray) -> list[tuple[float, float]]:
    """(x, y) of the top, bottom, left and right extremes of a boolean mask: the mean position of
    the extreme row / column's pixels, so a flat edge gives its middle."""
    ys, xs = np.nonzero(component)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    return [(float(xs[ys == top].mean()), float(top)), (float(xs[ys == bottom].mean()), float(bottom)),
            (float(left), float(ys[xs == left].mean())), (float(right), float(ys[xs == right].mean()))]


def lesion_components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the lesions, largest first (tiny slivers at the footprint's edge dropped)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in order if stats[i, cv2.CC_STAT_AREA] >= MIN_LESION_PIXELS]


def lower_quality(pixels: np.ndarray, seed: int) -> np.ndarray:
    """A worse acquisition of the same scan: blurred and with stronger speckle."""
    rng = np.random.default_rng(seed)
    blurred = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), LOW_BLUR_SIGMA)
    speckle = rng.gamma(LOW_LOOKS, 1.0 / LOW_LOOKS, pixels.shape).astype(np.float32)
    return np.clip(blurred * speckle, 0, 255).astype(np.uint8)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def generate_task_sets(out_dir: Path, num_images: int, seed: int = 0, min_size: int = 96,
                       max_size: int = 160) -> dict[str, int]:
    """Write the three task sets; returns how many images each holds."""
    if num_images < 4:
        raise ValueError(f"synthetic task sets need at least 4 images, got {num_images}")
    out_dir = Path(out_dir)
    landmark_rows, box_rows, counts = [], [], dict(landmarks=0, detection=0, enhancement=0)
    for i in range(num_images):
        rng = np.random.default_rng([seed, 17, i])
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        normal = i % round(1 / NORMAL_SHARE) == round(1 / NORMAL_SHARE) - 1
        kind = "breast_normal" if normal else LESION_SCENES[i % len(LESION_SCENES)]
        shot = Shot(kind, h, w, rng)
        frame = shot.frame(with_mask=True)
        pixels, name = frame.pixels, f"scan_{i:03d}.png"
        components = lesion_components(frame.mask)
        write_image(out_dir / "detection" / "images" / name, pixels, "png", 90)
        # only the kept lesions: a dropped sliver would be foreground without a box
        lesions = np.any(components, axis=0) if components else np.zeros(pixels.shape[:2], bool)
        write_image(out_dir / "detection" / "masks" / name, lesions.astype(np.uint8) * 255, "png", 90)
        if components:
            for comp in components:
                ys, xs = np.nonzero(comp)
                box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel edges
                box_rows.append([f"images/{name}", *map(str, box), "lesion", f"masks/{name}"])
        else:
            box_rows.append([f"images/{name}", "", "", "", "", "", ""])
        counts["detection"] += 1
        if components:
            write_image(out_dir / "landmarks" / "images" / name, pixels, "png", 90)
            points = extreme_points(components[0])
            landmark_rows.append([f"images/{name}", *(_fmt(v) for p in points for v in p),
                                  f"{shot.depth_cm * 10.0 / h:.5f}"])
            counts["landmarks"] += 1
        write_image(out_dir / "enhancement" / "high" / name, pixels, "png", 90)
        write_image(out_dir / "enhancement" / "low" / name, lower_quality(pixels, seed * 7919 + i), "png", 90)
        counts["enhancement"] += 1
    header = ["path"] + [f"{p}_{axis}" for p in POINTS for axis in ("x", "y")] + ["spacing"]
    atomic_write_text(out_dir / "landmarks" / "landmarks.csv", _csv_text(header, landmark_rows))
    atomic_write_text(out_dir / "detection" / "boxes.csv",
                      _csv_text(["path", "x1", "y1", "x2", "y2", "label", "mask"], box_rows))
    return counts
