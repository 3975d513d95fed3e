"""The simple baseline every downstream table shows (SPEC 9): linear models on raw pixels.

- classification: multinomial logistic regression on the image at PIXELS x PIXELS (area
  resize of the same 8-bit gray decode the fine-tuning runner uses), pixels standardised on the
  training set, class-balanced when `finetune.balance` is not none;
- regression: ridge regression on the same features;
- segmentation: per-pixel logistic regression on the raw PATCH x PATCH neighbourhood of each
  pixel at SEG_SIZE px plus its (row, col) position, upsampled to each mask's own size.
Fitted with full-batch L-BFGS in torch (already a dependency), L2 penalty L2 on the weights,
deterministic. A fine-tuned model that does not beat these points at the recipe, not the data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import mask_to_ids, read_gray, read_mask, resize_gray

PIXELS = 32          # classification/regression input side
SEG_SIZE = 64        # segmentation working resolution
PATCH = 7            # neighbourhood side of a pixel's features
MAX_PIXELS = 200_000  # training pixels sampled for the segmentation baseline
L2 = 1e-3            # weight penalty (per sample), keeps 1 024 pixel features from overfitting


def _features(samples, size: int) -> np.ndarray:
    return np.stack([resize_gray(read_gray(s.image), size).astype(np.float32).ravel() / 255.0 for s in samples])


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, weight: np.ndarray | None = None,
                 iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a multinomial logistic regression, full-batch L-BFGS."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    cw = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt, weight=cw) + 0.5 * L2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return (train - mean) / std, (val - mean) / std


def classification_baseline(train, val, num_classes: int, balanced: bool) -> dict:
    """details dict (y_true, probs) for report.py, like the runner's evaluate()."""
    xtr, xva = _standardise(_features(train, PIXELS), _features(val, PIXELS))
    ytr = np.array([int(s.target) for s in train])
    weight = None
    if balanced:
        counts = np.bincount(ytr, minlength=num_classes).astype(np.float64)
        weight = np.where(counts > 0, counts.sum() / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    w, b = fit_logistic(xtr, ytr, num_classes, weight)
    probs = torch.softmax(torch.from_numpy(xva).float() @ w + b, dim=1).numpy()
    return dict(y_true=np.array([int(s.target) for s in val]), probs=probs)


def regression_baseline(train, val) -> dict:
    xtr, xva = _standardise(_features(train, PIXELS), _features(val, PIXELS))
    ytr = np.array([float(s.target) for s in train])
    xtr1, xva1 = np.c_[xtr, np.ones(len(xtr))], np.c_[xva, np.ones(len(xva))]
    penalty = L2 * len(xtr) * np.eye(xtr1.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    coef = np.linalg.solve(xtr1.T @ xtr1 + penalty, xtr1.T @ ytr)
    return dict(true=np.array([float(s.target) for s in val]), pred=xva1 @ coef)


def _pixel_features(img: np.ndarray) -> np.ndarray:
    """(SEG_SIZE^2, PATCH^2 + 2): each pixel's raw neighbourhood (reflect-padded) and position."""
    x = torch.from_numpy(resize_gray(img, SEG_SIZE).astype(np.float32) / 255.0)[None, None]
    x = F.pad(x, (PATCH // 2,) * 4, mode="reflect")
    patches = F.unfold(x, PATCH)[0].T.numpy()  # (pixels, PATCH^2)
    rows, cols = np.meshgrid(np.linspace(-1, 1, SEG_SIZE), np.linspace(-1, 1, SEG_SIZE), indexing="ij")
    return np.c_[patches, rows.ravel(), cols.ravel()].astype(np.float32)


def segmentation_baseline(train, val, num_classes: int, mask_mode: str, nsd_tolerance: float) -> dict:
    """details dict (dices, nsds, has_target, kept) for report.py, like the runner's evaluate()."""
    import cv2

    from . import metrics as M

    feats, labels = [], []
    for s in train:
        ids = mask_to_ids(read_mask(s.target), mask_mode)
        feats.append(_pixel_features(read_gray(s.image)))
        labels.append(cv2.resize(ids.astype(np.int32), (SEG_SIZE, SEG_SIZE), interpolation=cv2.INTER_NEAREST).ravel())
    x, y = np.concatenate(feats), np.concatenate(labels)
    if len(x) > MAX_PIXELS:
        pick = np.random.default_rng(0).choice(len(x), MAX_PIXELS, replace=False)
        x, y = x[pick], y[pick]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    w, b = fit_logistic((x - mean) / std, y, num_classes)
    dices, nsds, has_target, kept = [], [], [], []
    for s in val:
        truth = mask_to_ids(read_mask(s.target), mask_mode)
        logits = torch.from_numpy((_pixel_features(read_gray(s.image)) - mean) / std).float() @ w + b
        small = logits.argmax(1).numpy().reshape(SEG_SIZE, SEG_SIZE).astype(np.int32)
        pred = cv2.resize(small, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
        d, n = M.segmentation_scores(pred, truth, num_classes, nsd_tolerance)
        dices.append(d)
        nsds.append(n)
        has_target.append([bool((truth == c).any()) for c in range(1, num_classes)])
        kept.append((truth, pred))
    return dict(dices=np.asarray(dices), nsds=np.asarray(nsds), has_target=np.asarray(has_target, dtype=bool),
                kept=kept)
