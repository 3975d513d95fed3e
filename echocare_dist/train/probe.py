"""The representation probe of validation: weighted k-NN over pooled encoder features, one task per
ontology level (SPEC 3's hierarchy: a sample's class at depth d is its one positive node there).

No fitting, so it costs one matrix product and measures the features as they are: a collapsed
encoder (all images alike) falls to the majority class at once, an improving one climbs. The
neighbours of a query never come from its own group (frames of one video, near-duplicates:
curation/valsplit.py), or the probe would reward memorising a scan. Votes are weighted by
exp(cosine / temperature), the usual k-NN monitor of self-supervised training.
"""
from __future__ import annotations

import numpy as np
import torch

TEMPERATURE = 0.07
ROWS_PER_CHUNK = 1024   # bounds the similarity block to ROWS_PER_CHUNK x N floats


def level_labels(labels: np.ndarray, depth: tuple[int, ...]) -> dict[int, np.ndarray]:
    """{level: class per sample (a node index) or -1}: the sample's single positive node at that
    depth; -1 where it has none there, or several (multi-label at that level: no single answer)."""
    depth_a = np.asarray(depth)
    positive = np.asarray(labels) == 1
    out = {}
    for level in sorted(set(depth)):
        nodes = np.flatnonzero(depth_a == level)
        pos = positive[:, nodes]
        single = pos.sum(1) == 1
        out[level] = np.where(single, nodes[pos.argmax(1)], -1).astype(np.int64)
    return out


def knn_predict(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Predicted class per sample (-1 where no labelled neighbour outside its group exists).
    `features` (N, D), `labels` (N,) with -1 = unlabelled (never a neighbour), `groups` (N,)."""
    n = len(features)
    pred = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return pred
    f = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    lab = torch.as_tensor(labels, dtype=torch.int64)
    grp = torch.as_tensor(groups, dtype=torch.int64)
    classes, lab_index = torch.unique(lab.clamp(min=-1), return_inverse=True)
    usable = lab >= 0
    k = min(k, n - 1)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, min(n, start + ROWS_PER_CHUNK))
        sim = f[rows] @ f.T
        blocked = (grp[rows, None] == grp[None, :]) | ~usable[None, :]
        sim = sim.masked_fill(blocked, -torch.inf)
        top, idx = sim.topk(k, dim=1)
        weight = torch.where(torch.isfinite(top), torch.exp(top / TEMPERATURE), torch.zeros_like(top))
        votes = torch.zeros(top.shape[0], len(classes), dtype=torch.float64)
        votes.scatter_add_(1, lab_index[idx], weight.double())
        best = votes.argmax(1)
        found = votes.sum(1) > 0
        pred[rows] = np.where(found.numpy(), classes[best].numpy(), -1)
    return pred


def probe_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, depth: tuple[int, ...],
                   k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{level: (correct per sample (bool), counted per sample (bool))} for the levels where the
    samples show at least two classes (one class is no test)."""
    out = {}
    for level, target in level_labels(labels, depth).items():
        if len(np.unique(target[target >= 0])) < 2:
            continue
        pred = knn_predict(features, target, groups, k)
        counted = (target >= 0) & (pred >= 0)
        out[level] = (counted & (pred == target), counted)
    return out
