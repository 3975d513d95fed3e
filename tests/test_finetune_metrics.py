"""Downstream metrics against small cases computed by hand (and, where it agrees by convention, sklearn)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from echocare_dist.finetune import metrics as M


def test_accuracy():
    assert M.accuracy([0, 1, 2, 2], [0, 2, 2, 2]) == pytest.approx(0.75)
    assert math.isnan(M.accuracy([], []))


def test_macro_f1_skips_a_class_absent_from_targets_and_predictions():
    # class 0: tp 1, support 2, predicted 1 -> 2/3; class 1: tp 2, support 2, predicted 3 -> 4/5;
    # class 2 occurs nowhere: undefined, skipped (not counted as 0 or 1).
    assert M.macro_f1([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # a class that is only predicted scores 0: (2/3 + 0) / 2
    assert M.macro_f1([0, 0], [0, 1], num_classes=2) == pytest.approx(1 / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    y, p = [0, 0, 1, 1, 3, 3, 3], [0, 1, 1, 1, 3, 0, 3]
    assert M.macro_f1(y, p, num_classes=5) == pytest.approx(sklearn.f1_score(y, p, average="macro"))


def test_binary_auc_counts_ties_as_half():
    # positives 0.8, 0.5 vs negatives 0.5, 0.2: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4
    assert M.binary_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
    assert M.binary_auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert M.binary_auc([0, 1, 0], [0.9, 0.1, 0.5]) == pytest.approx(0.0)
    assert math.isnan(M.binary_auc([1, 1], [0.2, 0.4]))


def _pairwise_auc(pos, scores):
    pos_s = [s for s, p in zip(scores, pos) if p]
    neg_s = [s for s, p in zip(scores, pos) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos_s, neg_s))
    return wins / (len(pos_s) * len(neg_s))


def test_auc_ovr_matches_pair_counting_with_ties_and_a_missing_class():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
    probs = rng.integers(0, 4, size=(len(y), 4)).astype(float) / 4  # many ties; class 3 never occurs
    expected = np.mean([_pairwise_auc(y == c, probs[:, c]) for c in range(3)])
    assert M.auc_ovr(y, probs) == pytest.approx(expected)
    sklearn = pytest.importorskip("sklearn.metrics")
    p3 = probs[:, :3] / probs[:, :3].sum(1, keepdims=True).clip(min=1e-9)
    p3[np.isnan(p3)] = 1 / 3
    assert M.auc_ovr(y, p3) == pytest.approx(sklearn.roc_auc_score(y, p3, multi_class="ovr", average="macro"))
    assert math.isnan(M.auc_ovr([1, 1, 1], np.ones((3, 2))))


def test_classification_metrics_bundle():
    out = M.classification_metrics([0, 1, 1], np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]]))
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert out["auc"] == pytest.approx(1.0)  # class-1 scores 0.6, 0.3 vs 0.1


def test_dice_with_empty_masks():
    empty = np.zeros((4, 4), bool)
    some = np.zeros((4, 4), bool)
    some[0, :2] = True
    assert M.dice(empty, empty) == 1.0
    assert M.dice(empty, some) == 0.0 and M.dice(some, empty) == 0.0
    half = np.zeros((4, 4), bool)
    half[0, 0] = True
    assert M.dice(half, some) == pytest.approx(2 * 1 / (1 + 2))


def _square(col0: int) -> np.ndarray:
    m = np.zeros((7, 9), bool)
    m[1:4, col0:col0 + 3] = True
    return m


def test_nsd_shifted_square():
    # 3x3 squares: 8 boundary pixels each (all but the centre). Shifting by 2 columns: per side,
    # 3 pixels at distance 0, 2 at distance 1 (the non-centre middle column), 3 at distance 2.
    gt, pred = _square(1), _square(3)
    assert M.normalized_surface_distance(pred, gt, 0) == pytest.approx(6 / 16)
    assert M.normalized_surface_distance(pred, gt, 1) == pytest.approx(10 / 16)
    assert M.normalized_surface_distance(pred, gt, 2) == pytest.approx(1.0)
    assert M.normalized_surface_distance(gt, gt, 0) == 1.0
    empty = np.zeros_like(gt)
    assert M.normalized_surface_distance(empty, empty, 1) == 1.0
    assert M.normalized_surface_distance(empty, gt, 5) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        M.normalized_surface_distance(gt, gt[:-1], 1)


def test_segmentation_scores_per_foreground_class():
    target = np.array([[0, 1, 1], [0, 2, 2], [0, 0, 0]])
    pred = np.array([[0, 1, 0], [0, 2, 2], [0, 0, 0]])
    dices, nsds = M.segmentation_scores(pred, target, num_classes=4, tolerance=1)
    assert dices == pytest.approx([2 / 3, 1.0, 1.0])  # class 3 absent from both -> 1
    assert nsds[1] == 1.0 and nsds[2] == 1.0 and 0 < nsds[0] <= 1


def test_mae():
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert math.isnan(M.mae([], []))
