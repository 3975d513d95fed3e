"""PNG figures of a fine-tuned model on its validation set: confusion matrix, ROC curves,
segmentation overlays. Drawn with OpenCV (already a dependency) so no plotting library is needed;
each function writes one PNG atomically and returns its path.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_write_bytes

FONT = cv2.FONT_HERSHEY_SIMPLEX
# BGR colours, distinct for colour-blind readers (Okabe-Ito)
PALETTE = [(178, 114, 0), (0, 159, 230), (115, 158, 0), (66, 228, 240), (167, 121, 204), (0, 94, 213),
           (233, 180, 86)]


def _write(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())
    return path


def _text(img, text, org, scale=0.45, colour=(0, 0, 0), thickness=1):
    cv2.putText(img, text, org, FONT, scale, colour, thickness, cv2.LINE_AA)


def confusion_png(cm: np.ndarray, names: list[str], path: Path) -> Path:
    """Rows = true class, columns = predicted; cells shaded by the row share, with the counts."""
    k = cm.shape[0]
    cell, left, top = 70, 150, 60
    img = np.full((top + k * cell + 40, left + k * cell + 20, 3), 255, np.uint8)
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    share = cm / rows
    for i in range(k):
        for j in range(k):
            shade = int(255 - 200 * share[i, j])
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (255, shade, shade), -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (120, 120, 120), 1)
            _text(img, str(int(cm[i, j])), (x0 + 8, y0 + cell // 2 + 5), 0.55,
                  (255, 255, 255) if share[i, j] > 0.6 else (0, 0, 0))
        _text(img, names[i][:18], (5, top + i * cell + cell // 2 + 5))
        _text(img, names[i][:8], (left + i * cell + 4, top - 8), 0.4)
    _text(img, "true \\ predicted", (5, 20), 0.5)
    return _write(path, img)


def roc_points(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    pos = np.asarray(is_positive, dtype=bool)[order]
    s = np.asarray(scores)[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each score value
    tp = np.cumsum(pos)[distinct]
    fp = np.cumsum(~pos)[distinct]
    n_pos, n_neg = max(int(pos.sum()), 1), max(int((~pos).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def roc_png(y_true: np.ndarray, probs: np.ndarray, names: list[str], aucs: list[float], path: Path) -> Path:
    """One-vs-rest ROC curve per class that has positives and negatives."""
    size, margin = 360, 50
    img = np.full((size + 2 * margin, size + 2 * margin + 170, 3), 255, np.uint8)
    x0, y1 = margin, margin + size
    cv2.rectangle(img, (x0, margin), (x0 + size, y1), (0, 0, 0), 1)
    cv2.line(img, (x0, y1), (x0 + size, margin), (180, 180, 180), 1, cv2.LINE_AA)
    for c, name in enumerate(names):
        is_pos = np.asarray(y_true) == c
        if is_pos.all() or not is_pos.any():
            continue
        fpr, tpr = roc_points(is_pos, np.asarray(probs)[:, c])
        pts = np.stack([x0 + fpr * size, y1 - tpr * size], axis=1).round().astype(np.int32)
        colour = PALETTE[c % len(PALETTE)]
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        _text(img, f"{name[:14]} AUC {aucs[c]:.3f}", (x0 + size + 10, margin + 20 + 20 * c), 0.45, colour)
    _text(img, "false positive rate", (x0 + size // 2 - 70, y1 + 35))
    _text(img, "true positive rate", (5, margin - 15))
    for t in (0.0, 0.5, 1.0):
        _text(img, f"{t:.1f}", (x0 + int(t * size) - 10, y1 + 18), 0.4)
        _text(img, f"{t:.1f}", (x0 - 30, y1 - int(t * size) + 5), 0.4)
    return _write(path, img)


def overlay_png(items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, tile: int = 192) -> Path:
    """Rows of (gray image, ground-truth ids, predicted ids, caption): ground truth outlined in
    green, prediction in magenta, on the image at `tile` pixels."""
    cols = 4
    rows = (len(items) + cols - 1) // cols
    sheet = np.full((max(rows, 1) * (tile + 20), cols * tile, 3), 255, np.uint8)
    for n, (gray, gt, pred, caption) in enumerate(items):
        r, c = divmod(n, cols)
        img = cv2.cvtColor(cv2.resize(gray, (tile, tile), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
        for ids, colour in ((gt, (0, 200, 0)), (pred, (255, 0, 255))):
            small = cv2.resize(ids.astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours((small > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, colour, 1)
        y = r * (tile + 20)
        sheet[y:y + tile, c * tile:(c + 1) * tile] = img
        _text(sheet, caption[:30], (c * tile + 3, y + tile + 14), 0.38)
    return _write(path, sheet)


def curves_png(history: list[dict], monitor: str, path: Path) -> Path:
    """Learning curves: train and validation loss (left axis, shared scale) and the validation
    monitor (right axis, its own scale) per epoch; a flat train loss means the model does not fit
    even its training set (a recipe problem), a falling train loss with a rising validation loss
    means it memorises (a data-size problem)."""
    w, h, margin = 420, 260, 50
    img = np.full((h + 2 * margin, w + 2 * margin + 40, 3), 255, np.uint8)
    cv2.rectangle(img, (margin, margin), (margin + w, margin + h), (0, 0, 0), 1)
    epochs = [row["epoch"] for row in history]
    series = [("train_loss", [row["train_loss"] for row in history], PALETTE[0], "left"),
              ("val_loss", [row.get("val_loss", np.nan) for row in history], PALETTE[1], "left"),
              (f"val_{monitor}", [row.get(f"val_{monitor}", np.nan) for row in history], PALETTE[2], "right")]
    losses = np.array([v for _, vals, _, side in series if side == "left" for v in vals], dtype=np.float64)
    ranges = {"left": (np.nanmin(losses), np.nanmax(losses))}
    mon = np.array(series[2][1], dtype=np.float64)
    ranges["right"] = (np.nanmin(mon), np.nanmax(mon)) if np.isfinite(mon).any() else (0.0, 1.0)
    span = max(len(epochs) - 1, 1)
    for n, (name, vals, colour, side) in enumerate(series):
        lo, hi = ranges[side]
        hi = hi if hi > lo else lo + 1.0
        pts = [(margin + int(round((e - epochs[0]) / span * w)), margin + h - int(round((v - lo) / (hi - lo) * h)))
               for e, v in zip(epochs, vals) if np.isfinite(v)]
        if len(pts) >= 2:
            cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1)
        _text(img, f"{name} ({side}: {lo:.3g}..{hi:.3g})", (margin, 18 + 14 * n), 0.4, colour)
    _text(img, f"epoch {epochs[0]}..{epochs[-1]}", (margin + w // 2 - 40, margin + h + 30), 0.45)
    return _write(path, img)
