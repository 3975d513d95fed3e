"""Downstream metrics, implemented here so their conventions are explicit and tested.

Conventions (the report's tables use the same ones):
- macro-F1 averages over the classes that occur in the targets OR the predictions; a class
  absent from both has an undefined F1 (0/0) and is skipped, a class only predicted scores 0.
- AUC is one-vs-rest, macro-averaged over the classes that have both positives and negatives
  among the targets; it is the exact Mann-Whitney statistic with mid-ranks, so tied scores
  count one half. NaN when no class qualifies (e.g. a validation set with a single class).
- Dice and NSD are computed per image and per foreground class (class 0 = background), then
  averaged. Both masks empty -> 1 (absence predicted correctly); exactly one empty -> 0.
  That "empty-empty counts" convention (`dice`, `nsd`) rewards a background-only predictor on
  sets with many normal images, so `dice_lesion` / `nsd_lesion` average only the (image, class)
  pairs whose ground truth holds the class (NaN when none does). Both are always reported.
- 95% confidence intervals: percentile bootstrap over validation images (`bootstrap_ci`).
- NSD (Nikolov et al. 2021): share of both boundaries lying within `tolerance` pixels of the
  other boundary. Boundaries are the mask pixels with a 4-neighbour outside the mask (the image
  border counts as outside).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

try:  # scipy gives exact Euclidean distance transforms; cv2's L2 mask is the fallback
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - scipy is installed in our environments
    _ndimage = None


# --------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------
def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return math.nan
    return float((y_true == y_pred).mean())


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return math.nan
    n = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values
    boundaries = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1], True])
    ranks_sorted = np.empty(len(x), dtype=np.float64)
    for lo, hi in zip(boundaries[:-1], boundaries[1:]):
        ranks_sorted[lo:hi] = (lo + 1 + hi) / 2.0
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def binary_auc(is_positive: Sequence[bool], scores: Sequence[float]) -> float:
    """Exact ROC AUC = P(score_pos > score_neg) + 0.5 P(equal); NaN if one side is empty."""
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_ovr(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over classes with both positives and negatives in `y_true`."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    values = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> dict:
    probs = np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    return dict(accuracy=accuracy(y_true, y_pred),
                macro_f1=macro_f1(y_true, y_pred, probs.shape[1]),
                auc=auc_ovr(y_true, probs))


# --------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------
def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(pred, target).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
    if _ndimage is not None:
        eroded = _ndimage.binary_erosion(mask, structure=_ndimage.generate_binary_structure(2, 1),
                                         border_value=0)
    else:  # pragma: no cover
        import cv2
        padded = np.pad(mask.astype(np.uint8), 1)
        cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        eroded = cv2.erode(padded, cross)[1:-1, 1:-1].astype(bool)
    return mask & ~eroded


def _distance_to(points: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of `points`."""
    if _ndimage is not None:
        return _ndimage.distance_transform_edt(~points)
    import cv2  # pragma: no cover
    return cv2.distanceTransform((~points).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def normalized_surface_distance(pred: np.ndarray, target: np.ndarray, tolerance: float) -> float:
    """NSD at `tolerance` pixels; 1 when both masks are empty, 0 when exactly one is."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"NSD needs masks of one shape, got {pred.shape} and {target.shape}")
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return 1.0
    if has_pred != has_target:
        return 0.0
    b_pred, b_target = _boundary(pred), _boundary(target)
    close_pred = int((_distance_to(b_target)[b_pred] <= tolerance).sum())
    close_target = int((_distance_to(b_pred)[b_target] <= tolerance).sum())
    return (close_pred + close_target) / float(b_pred.sum() + b_target.sum())


def segmentation_scores(pred: np.ndarray, target: np.ndarray, num_classes: int,
                        tolerance: float) -> tuple[list[float], list[float]]:
    """Per foreground class Dice and NSD of one image (label maps of one shape)."""
    dices, nsds = [], []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        dices.append(dice(p, t))
        nsds.append(normalized_surface_distance(p, t, tolerance))
    return dices, nsds


# --------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------
def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y_true.size == 0:
        return math.nan
    return float(np.abs(y_true - y_pred).mean())


def segmentation_summary(dices: np.ndarray, nsds: np.ndarray, has_target: np.ndarray) -> dict:
    """(images, foreground classes) arrays -> both Dice/NSD conventions (module docstring)."""
    dices, nsds, has_target = np.asarray(dices), np.asarray(nsds), np.asarray(has_target, dtype=bool)
    out = dict(dice=float(dices.mean()), nsd=float(nsds.mean()))
    out["dice_lesion"] = float(dices[has_target].mean()) if has_target.any() else math.nan
    out["nsd_lesion"] = float(nsds[has_target].mean()) if has_target.any() else math.nan
    return out


def bootstrap_ci(metric, arrays: Sequence[np.ndarray], resamples: int, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `metric(*arrays)`, resampling rows (images) with replacement.
    Resamples where the metric is undefined (NaN, e.g. one class only) are left out."""
    n = len(arrays[0])
    if resamples <= 0 or n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = metric(*(np.asarray(a)[idx] for a in arrays))
        if not math.isnan(v):
            values.append(v)
    if len(values) < max(10, resamples // 10):
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


# Direction of each metric, for best-checkpoint selection.
LOWER_IS_BETTER = {"mae", "loss", "mre", "mse", "mre_mm"}  # the last three: landmark errors (tasks/landmarks.py)
