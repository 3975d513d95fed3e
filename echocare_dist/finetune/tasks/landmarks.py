"""finetune.task=landmarks: K named points per image.

Annotations (`finetune.csv`, paths relative to `finetune.data` when set, else to the file):
- CSV, header `path,<name>_x,<name>_y,...` or `path,x1,y1,x2,y2,...` (names point1, point2, ...),
  optional `spacing` column (mm per pixel of the original image: errors in mm too);
- JSON: {"landmarks": [names], "images": [{"path": ..., "points": [[x, y], ...], "spacing": mm}]}.
Coordinates are pixels of the original image, pixel centres at integers (0 .. width-1).

Head: the multi-scale decoder predicts one heatmap per point at the input resolution. Training
target: a Gaussian (`finetune.heatmap_sigma` input pixels) per point; loss = cross-entropy of the
spatially soft-maxed heatmap against the normalised Gaussian + the L1 distance (in units of the
input size) of the soft-argmax, which keeps the peak where the point is. Decoding is sub-pixel: the
probability-weighted mean in a window of 3 sigma around the peak, symmetric about it (shrunk at
the border; a global soft-argmax is pulled to the image centre by the tails). Predictions are
mapped back to original pixels, where the metrics are taken: mean radial error `mre` (and
`mre_mm`), mean squared radial error `mse` (px^2), and the success-detection rates `sdr_2`,
`sdr_4`, `sdr_10` (share of points within 2 / 4 / 10 px).
No flips or geometric augmentation: named points can be lateral, a flip would swap their meaning.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import DataError, Sample, TaskData, read_gray
from ..metrics import bootstrap_ci
from . import overlays
from .base import ImageDataset, TaskSpec, image_size, number, read_rows, resolve_image, sample_key

SUCCESS_RADII = (2, 4, 10)  # pixels, the report's success rates


@dataclass(frozen=True)
class LandmarkTarget:
    points: tuple[tuple[float, float], ...]   # original pixels
    width: int
    height: int
    spacing: float | None                     # mm per pixel


def _point_names(header: list[str], where: str) -> tuple[list[str], list[tuple[int, int]]]:
    cols = [c for c in header[1:] if c != "spacing"]
    if len(cols) < 2 or len(cols) % 2:
        raise DataError(f"{where}: after 'path' the header needs x,y column pairs (and optionally 'spacing'), "
                        f"got {header}")
    names, pairs = [], []
    for a, b in zip(cols[0::2], cols[1::2]):
        if a.endswith("_x") and b.endswith("_y") and a[:-2] == b[:-2]:
            names.append(a[:-2])
        elif a[:1] == "x" and b[:1] == "y" and a[1:] == b[1:] and a[1:].isdigit():
            names.append(f"point{a[1:]}")
        else:
            raise DataError(f"{where}: columns {a!r},{b!r} are not an x,y pair (<name>_x,<name>_y or xN,yN)")
        pairs.append((header.index(a), header.index(b)))
    return names, pairs


def _check_point(x: float, y: float, name: str, w: int, h: int, path: Path, where: str) -> None:
    # half a pixel of slack: pixel centres run 0..w-1, the image's edge is at -0.5 and w-0.5
    if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
        raise DataError(f"{where}: point {name!r} ({x:g}, {y:g}) lies outside the image {path} ({w}x{h})")


def read_landmarks(ann: Path, base: Path) -> tuple[list[str], list[tuple[Path, tuple, float | None, str]]]:
    """(point names, [(image, points, spacing, where)]) from a CSV or JSON annotation file."""
    rows = []
    if ann.suffix.lower() == ".json":
        try:
            doc = json.loads(ann.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read landmark JSON {ann}: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise DataError(f"landmark JSON {ann}: expected an object with 'landmarks' and 'images' lists")
        names = [str(n) for n in doc.get("landmarks") or []]
        for i, item in enumerate(doc["images"]):
            where = f"landmark JSON {ann} images[{i}]"
            pts = item.get("points") if isinstance(item, dict) else None
            if not isinstance(pts, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pts):
                raise DataError(f"{where}: 'points' must be a list of [x, y]")
            names = names or [f"point{k + 1}" for k in range(len(pts))]
            if len(pts) != len(names):
                raise DataError(f"{where}: {len(pts)} points, expected {len(names)} ({names})")
            spacing = item.get("spacing")
            rows.append((str(item.get("path", "")), [(number(str(x), "x", where), number(str(y), "y", where))
                                                     for x, y in pts],
                         None if spacing is None else number(str(spacing), "spacing", where), where))
    else:
        header, body = read_rows(ann)
        if not header or header[0] != "path":
            raise DataError(f"landmark CSV {ann}: the first column must be 'path', got {header}")
        names, pairs = _point_names(header, f"landmark CSV {ann}")
        sp = header.index("spacing") if "spacing" in header else None
        for line, cells in body:
            where = f"landmark CSV {ann} line {line}"
            pts = [(number(cells[a], f"{n}_x", where), number(cells[b], f"{n}_y", where))
                   for n, (a, b) in zip(names, pairs)]
            rows.append((cells[0], pts, number(cells[sp], "spacing", where) if sp is not None else None, where))
    out = []
    for rel, pts, spacing, where in rows:
        if not rel:
            raise DataError(f"{where}: empty 'path'")
        if spacing is not None and spacing <= 0:
            raise DataError(f"{where}: spacing {spacing:g} must be positive (mm per pixel)")
        path = resolve_image(base, rel, where)
        w, h = image_size(path)
        for (x, y), n in zip(pts, names):
            _check_point(x, y, n, w, h, path, where)
        out.append((path, tuple(pts), spacing, where))
    return names, out


def decode_heatmaps(logits: torch.Tensor, sigma: float) -> np.ndarray:
    """(B, K, S, S) logits -> (B, K, 2) sub-pixel (x, y) at input resolution."""
    b, k, s, _ = logits.shape
    probs = logits.float().flatten(2).softmax(-1).view(b, k, s, s).cpu().numpy()
    r = max(1, int(math.ceil(3 * sigma)))
    out = np.zeros((b, k, 2), np.float64)
    for i in range(b):
        for j in range(k):
            p = probs[i, j]
            y0, x0 = np.unravel_index(int(p.argmax()), p.shape)
            # a window symmetric about the peak (shrunk at the border) keeps the mean unbiased
            ry, rx = min(r, y0, s - 1 - y0), min(r, x0, s - 1 - x0)
            ys, xs = slice(y0 - ry, y0 + ry + 1), slice(x0 - rx, x0 + rx + 1)
            win = p[ys, xs]
            gy, gx = np.mgrid[ys, xs]
            total = win.sum()
            out[i, j] = ((gx * win).sum() / total, (gy * win).sum() / total) if total > 0 else (x0, y0)
    return out


def to_input_coords(points, width: int, height: int, size: int) -> np.ndarray:
    p = np.asarray(points, np.float64)
    return np.stack([(p[:, 0] + 0.5) * size / width - 0.5, (p[:, 1] + 0.5) * size / height - 0.5], axis=1)


def to_original_coords(points: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    return np.stack([(points[:, 0] + 0.5) * width / size - 0.5, (points[:, 1] + 0.5) * height / size - 0.5], axis=1)


def landmark_summary(errors: np.ndarray, spacing: np.ndarray) -> dict:
    """errors: (images, K) radial errors in original pixels; spacing: (images,) mm/px or NaN."""
    out = dict(mre=float(errors.mean()), mse=float((errors ** 2).mean()))
    for r in SUCCESS_RADII:
        out[f"sdr_{r}"] = float((errors <= r).mean())
    out["mre_mm"] = float((errors * spacing[:, None]).mean()) if np.isfinite(spacing).all() else math.nan
    return out


class LandmarkDataset(ImageDataset):
    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        t: LandmarkTarget = s.target
        coords = to_input_coords(t.points, t.width, t.height, self.size)
        return dict(image=self.to_input(self.load(s.image)), index=index,
                    target=torch.from_numpy(coords.astype(np.float32)))


class LandmarkTask(TaskSpec):
    name = "landmarks"
    metrics = ("mre", "sdr_2", "sdr_4", "sdr_10", "mse", "mre_mm")
    monitor = "mre"
    lower_is_better = frozenset({"mre", "mse", "mre_mm"})
    baseline_name = "mean position"

    def discover(self, ft, root: Path, csv_path: Path | None) -> TaskData:
        if csv_path is None:
            raise DataError("finetune.task=landmarks needs finetune.csv (a CSV path,x1,y1,... or a JSON file)")
        names, rows = read_landmarks(csv_path, root)
        samples = []
        for path, pts, spacing, _ in rows:
            w, h = image_size(path)
            samples.append(Sample(path, LandmarkTarget(pts, w, h, spacing), sample_key(path, root)))
        return TaskData(samples, None, root, target_names=names)

    def num_outputs(self, task: TaskData, ft) -> int:
        return len(task.target_names)

    def dataset(self, samples, train: bool, ft, common: dict) -> LandmarkDataset:
        return LandmarkDataset(samples, train, **common)

    def loss(self, out: torch.Tensor, target: torch.Tensor, ft) -> torch.Tensor:
        b, k, s, _ = out.shape
        grid = torch.arange(s, device=out.device, dtype=torch.float32)
        gx = torch.exp(-((grid[None, None, :] - target[..., 0:1]) ** 2) / (2 * ft.heatmap_sigma ** 2))
        gy = torch.exp(-((grid[None, None, :] - target[..., 1:2]) ** 2) / (2 * ft.heatmap_sigma ** 2))
        gauss = (gy[..., :, None] * gx[..., None, :]).flatten(2)
        gauss = gauss / gauss.sum(-1, keepdim=True).clamp_min(1e-12)
        logp = out.flatten(2).log_softmax(-1)
        ce = -(gauss * logp).sum(-1).mean()
        p = logp.exp().view(b, k, s, s)
        expected = torch.stack([(p.sum(2) * grid).sum(-1), (p.sum(3) * grid).sum(-1)], dim=-1)
        return ce + (expected - target).abs().mean() / s

    def evaluate(self, runner, model, keep: int) -> tuple[dict, dict]:
        losses, n, errors, spacing, preds = 0.0, 0, [], [], []
        for batch in runner.val_loader:
            x = batch["image"].to(runner.device)
            target = batch["target"].to(runner.device)
            with runner._autocast():
                out = model(x)
            losses += self.loss(out.float(), target, runner.ft).item() * len(x)
            n += len(x)
            for coords, index in zip(decode_heatmaps(out, runner.ft.heatmap_sigma), batch["index"]):
                t: LandmarkTarget = runner.val_set.samples[index].target
                pred = to_original_coords(coords, t.width, t.height, runner.img_size)
                errors.append(np.linalg.norm(pred - np.asarray(t.points), axis=1))
                spacing.append(math.nan if t.spacing is None else t.spacing)
                preds.append(pred)
        details = dict(errors=np.asarray(errors), spacing=np.asarray(spacing), preds=preds)
        return dict(loss=losses / max(n, 1), **landmark_summary(details["errors"], details["spacing"])), details

    def final(self, details: dict, resamples: int, seed: int) -> dict:
        errors, spacing = details["errors"], details["spacing"]
        out = landmark_summary(errors, spacing)
        for name in self.metrics:
            def fn(e, s, name=name):
                return landmark_summary(e, s)[name]
            out[f"{name}_ci"] = list(bootstrap_ci(fn, [errors, spacing], resamples, seed))
        return out

    def figures(self, runner, details: dict) -> list[Path]:
        items = []
        for sample, pred, err in list(zip(runner.val_set.samples, details["preds"], details["errors"]))[:8]:
            items.append((read_gray(sample.image), np.asarray(sample.target.points), pred,
                          f"{Path(sample.key).name} MRE {err.mean():.1f}px"))
        return [overlays.points_png(items, runner.task_data.target_names, runner.run_dir / "overlays.png")]

    def baseline(self, train, val, runner) -> dict:
        """Every point at its mean training position (as a share of the image's width / height)."""
        rel = np.mean([np.asarray(s.target.points) / [s.target.width, s.target.height] for s in train], axis=0)
        errors, spacing, preds = [], [], []
        for s in val:
            pred = rel * [s.target.width, s.target.height]
            errors.append(np.linalg.norm(pred - np.asarray(s.target.points), axis=1))
            spacing.append(math.nan if s.target.spacing is None else s.target.spacing)
            preds.append(pred)
        return dict(errors=np.asarray(errors), spacing=np.asarray(spacing), preds=preds)
