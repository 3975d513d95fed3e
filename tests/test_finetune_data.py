"""Fine-tuning data rules on generated copies of real-collection quirks (issue 13): mask files in
class folders, masks beside their images (one or several per image), `Test_Image_N` / `mask_N`
pairing, bad masks (no image, empty, other size, 16-bit, colour), group-aware splits, metric
conventions, augmentation and the raw-pixel baseline. No training here (test_finetune_eval.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError


def _speckle(rng, h, w, level) -> np.ndarray:
    """B-mode-like: multiplicative (gamma) speckle, so the curation rule sees texture."""
    return np.clip(level * rng.gamma(4.0, 0.25, (h, w)), 0, 255).astype(np.uint8)


def _box_mask(h, w, r0, c0, rh, cw, value=255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[r0:r0 + rh, c0:c0 + cw] = value
    return m


def _save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _ft(*overrides: str):
    return load_config("tiny_cpu", list(overrides)).finetune


def _discover(ft):
    from echocare_dist.finetune.discovery import discover
    return discover(ft, Path)


# ------------------------------------------------------------------------------ discovery
def test_class_folders_leave_masks_out_by_name_and_content_and_count_them(tmp_path):
    rng = np.random.default_rng(0)
    for cls, level in (("benign", 150), ("normal", 90)):
        for i in (1, 2, 3):
            _save(_speckle(rng, 50, 70, level), tmp_path / cls / f"{cls} ({i}).png")
            _save(_box_mask(50, 70, 10, 10, 20, 30), tmp_path / cls / f"{cls} ({i})_mask.png")
        _save(_box_mask(50, 70, 5, 5, 10, 10), tmp_path / cls / f"x ({cls})_mask_1.png")
    _save(_box_mask(50, 70, 20, 20, 15, 15), tmp_path / "benign" / "outline 7.png")  # a mask by content only
    task = _discover(_ft(f"finetune.data={tmp_path}"))
    assert task.class_names == ["benign", "normal"]
    expected = [f"{c}/{c} ({i}).png" for c in ("benign", "normal") for i in (1, 2, 3)]
    assert sorted(s.key for s in task.samples) == expected
    assert len(task.skipped["mask_like_name"]) == 8
    assert task.skipped["mask_like_content"] == ["benign/outline 7.png"]
    kept_all = _discover(_ft(f"finetune.data={tmp_path}", "finetune.skip_mask_like=false"))
    assert len(kept_all.samples) == 6 + 9 and not kept_all.skipped  # the opt-out keeps everything


def _busi_like(root: Path, rng) -> None:
    """BUSI layout: masks beside images, one image with two masks, one normal (empty mask)."""
    for i in range(1, 5):
        img = _speckle(rng, 60, 80, 120)
        _save(img, root / "benign" / f"benign ({i}).png")
        _save(_box_mask(60, 80, 10, 10, 20, 20), root / "benign" / f"benign ({i})_mask.png")
    _save(_box_mask(60, 80, 40, 50, 10, 20), root / "benign" / "benign (2)_mask_1.png")
    _save(_speckle(rng, 60, 80, 100), root / "normal" / "normal (1).png")
    _save(np.zeros((60, 80), np.uint8), root / "normal" / "normal (1)_mask.png")


def test_segmentation_masks_beside_images_several_merged_empty_counted(tmp_path):
    from echocare_dist.finetune.data import read_mask

    _busi_like(tmp_path, np.random.default_rng(1))
    _save(_box_mask(60, 80, 1, 1, 5, 5), tmp_path / "benign" / "benign (9)_mask.png")  # its image is missing
    task = _discover(_ft("finetune.task=segmentation", f"finetune.data={tmp_path}"))
    by_key = {s.key: s for s in task.samples}
    assert sorted(by_key) == [f"benign/benign ({i}).png" for i in range(1, 5)] + ["normal/normal (1).png"]
    two = by_key["benign/benign (2).png"].target
    assert [p.name for p in two] == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    merged = read_mask(two)
    assert merged[15, 15] == 255 and merged[45, 60] == 255 and merged[0, 0] == 0  # union of both masks
    assert task.skipped["mask_without_image"] == ["benign/benign (9)_mask.png"]
    assert task.skipped["empty_mask_kept"] == ["normal/normal (1).png"]
    assert task.mask_values == {0, 255}
    skipping = _discover(_ft("finetune.task=segmentation", f"finetune.data={tmp_path}", "finetune.empty_masks=skip"))
    assert len(skipping.samples) == 4 and skipping.skipped["empty_mask"] == ["normal/normal (1).png"]


def test_test_image_n_mask_n_pairing_by_pattern(tmp_path):
    rng = np.random.default_rng(2)
    for n in range(1, 5):
        _save(_speckle(rng, 40, 40, 120), tmp_path / "hip" / f"Test_Image_{n}.png")
        _save(_box_mask(40, 40, 5, 5, 10, 10 + n), tmp_path / "hip" / f"mask_{n}.png")
    _save(_box_mask(40, 40, 5, 5, 10, 10), tmp_path / "hip" / "mask_42.png")
    pattern = ["finetune.task=segmentation", f"finetune.data={tmp_path}"]
    with pytest.raises(DataError, match=r"4 image\(s\) have no mask beside it.*Test_Image_1.png"):
        _discover(_ft(*pattern))  # without the pattern nothing pairs: a clear error, not a silent mix
    task = _discover(_ft(*pattern, "finetune.image_pattern=Test_Image_{id}", "finetune.mask_pattern=mask_{id}"))
    assert {s.key: s.target[0].name for s in task.samples} == {f"hip/Test_Image_{n}.png": f"mask_{n}.png"
                                                             for n in range(1, 5)}
    assert task.skipped["mask_without_image"] == ["hip/mask_42.png"]
    from echocare_dist.config import ConfigError
    with pytest.raises(ConfigError, match="mask_pattern"):
        _ft(*pattern, "finetune.image_pattern=Test_Image_{id}")


def test_bad_masks_other_size_16_bit_colour(tmp_path):
    from echocare_dist.finetune.data import read_mask_values

    rng = np.random.default_rng(3)
    root = tmp_path / "seg"
    for i in range(3):
        _save(_speckle(rng, 60, 80, 120), root / "images" / f"s{i}.png")
    _save(_box_mask(30, 40, 5, 5, 10, 10), root / "masks" / "s0.png")           # half size, same aspect: kept
    _save(_box_mask(80, 60, 5, 5, 10, 10), root / "masks" / "s1_mask.png")      # transposed: another frame
    sixteen = _box_mask(60, 80, 10, 10, 20, 20).astype(np.uint16) * 257         # 0/65535
    Image.fromarray(sixteen).save(root / "masks" / "s2.png")
    assert read_mask_values(root / "masks" / "s2.png").max() == 255
    task = _discover(_ft("finetune.task=segmentation", f"finetune.data={root}"))
    assert sorted(s.key for s in task.samples) == ["images/s0.png", "images/s2.png"]
    assert task.skipped["mask_size_mismatch"] == ["images/s1.png (80x60) vs mask 60x80"]

    ids16 = np.zeros((4, 4), np.uint16)
    ids16[0, :2], ids16[1, :3] = 1 * 257, 2 * 257   # 8-bit ids stretched to 16 bits
    Image.fromarray(ids16).save(tmp_path / "ids16.png")
    assert sorted(np.unique(read_mask_values(tmp_path / "ids16.png")).tolist()) == [0, 1, 2]
    odd = np.array([[0, 300], [301, 40000]], np.uint16)
    Image.fromarray(odd).save(tmp_path / "odd16.png")
    with pytest.raises(DataError, match=r"16-bit mask .*odd16.png holds values \[0, 300, 301, 40000\]"):
        read_mask_values(tmp_path / "odd16.png")


@pytest.mark.slow
def test_bad_input_through_the_cli_is_a_message_not_a_traceback(tmp_path, capsys):
    from echocare_dist.cli import main
    from echocare_dist.export import write_export
    from echocare_dist.models import build_model
    from echocare_dist.ontology import load_ontology

    cfg = load_config("tiny_cpu")
    write_export(build_model(cfg.model, len(load_ontology(cfg.resolve_path(cfg.ontology.path)))).state_dict(),
                 cfg, tmp_path / "export")
    root = tmp_path / "colour"
    rng = np.random.default_rng(4)
    _save(_speckle(rng, 40, 40, 120), root / "a (1).png")
    red = np.zeros((40, 40, 3), np.uint8)
    red[5:20, 5:20, 0] = 255
    _save(red, root / "a (1)_mask.png")
    args = ["finetune", "--set", "finetune.task=segmentation", "--set", f"finetune.data={root}",
            "--set", f"finetune.checkpoint={tmp_path / 'export' / 'encoder.safetensors'}",
            "--set", f"finetune.run_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a (1)_mask.png is a colour image" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ splits
def test_duplicates_and_near_duplicates_never_cross_train_val(tmp_path):
    from echocare_dist.finetune.splits import make_splits

    rng = np.random.default_rng(5)
    originals = {}
    for cls, level in (("benign", 150), ("malignant", 90)):
        for i in range(10):
            img = _speckle(rng, 64, 64, level)
            originals[f"{cls}/{cls} ({i}).png"] = img
            _save(img, tmp_path / cls / f"{cls} ({i}).png")
    # an exact copy under another name, a caliper-marked copy, and a brighter re-save
    _save(originals["benign/benign (0).png"], tmp_path / "benign" / "copy of benign 0.png")
    calipers = originals["benign/benign (1).png"].copy()
    calipers[30:32, 20:24] = 255
    _save(calipers, tmp_path / "benign" / "benign (1) calipers.png")
    _save(np.clip(originals["malignant/malignant (2).png"].astype(int) + 6, 0, 255).astype(np.uint8),
          tmp_path / "malignant" / "malignant (2) bright.png")
    families = [{"benign/benign (0).png", "benign/copy of benign 0.png"},
                {"benign/benign (1).png", "benign/benign (1) calipers.png"},
                {"malignant/malignant (2).png", "malignant/malignant (2) bright.png"}]
    task = _discover(_ft(f"finetune.data={tmp_path}"))
    for seed in range(4):
        for folds in (1, 3):
            ft = _ft(f"finetune.data={tmp_path}", f"finetune.seed={seed}", f"finetune.folds={folds}",
                     "finetune.val_fraction=0.3")
            parts = make_splits(task, ft)
            assert len(parts) == folds
            for train, val in parts:
                sides = {s.key: "train" for s in train} | {s.key: "val" for s in val}
                for fam in families:
                    assert len({sides[k] for k in fam}) == 1, (seed, folds, fam, sides)
                assert {s.target for s in val} == {0, 1}  # stratified: both classes validated
            if folds > 1:  # folds partition the data
                vals = [s.key for _, val in parts for s in val]
                assert sorted(vals) == sorted(s.key for s in task.samples)
    exact_only = make_splits(task, _ft(f"finetune.data={tmp_path}", "finetune.split_similarity=1.0"))
    assert exact_only  # the exact pair is still grouped (checked via grouping below)
    from echocare_dist.finetune.splits import group_samples
    g = group_samples(task.samples, 1.0, classification=True)
    assert (g.exact_pairs, g.near_pairs) == (1, 0)
    g = group_samples(task.samples, 0.95, classification=True)
    assert (g.exact_pairs, g.near_pairs) == (1, 2) and g.conflicting_groups == 0


# ------------------------------------------------------------------------------ metrics
def test_dice_both_conventions_and_bootstrap_ci():
    from echocare_dist.finetune import metrics as M

    # half the validation images are normal: a background-only predictor
    truth = [_box_mask(20, 20, 5, 5, 8, 8) // 255 for _ in range(5)] + [np.zeros((20, 20), np.uint8)] * 5
    pred = [np.zeros((20, 20), np.uint8)] * 10
    scores = [M.segmentation_scores(p, t, 2, 1.0) for p, t in zip(pred, truth)]
    dices, nsds = np.array([s[0] for s in scores]), np.array([s[1] for s in scores])
    has = np.array([[t.any()] for t in truth])
    out = M.segmentation_summary(dices, nsds, has)
    assert out["dice"] == pytest.approx(0.5) and out["dice_lesion"] == 0.0 and out["nsd_lesion"] == 0.0
    assert math.isnan(M.segmentation_summary(dices[5:], nsds[5:], has[5:])["dice_lesion"])

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    scores = y + rng.normal(0, 0.8, 200)
    auc = M.binary_auc(y == 1, scores)
    lo, hi = M.bootstrap_ci(lambda a, b: M.binary_auc(a == 1, b), [y, scores], 300, seed=1)
    assert lo < auc < hi and hi - lo < 0.25
    assert (lo, hi) == M.bootstrap_ci(lambda a, b: M.binary_auc(a == 1, b), [y, scores], 300, seed=1)
    assert all(math.isnan(v) for v in M.bootstrap_ci(M.mae, [np.ones(1), np.ones(1)], 100))


def test_class_weights_balance_the_classes():
    import torch

    from echocare_dist.finetune.losses import class_weights

    w = class_weights([0] * 6 + [1] * 2 + [2] * 2, 4)  # class 3 absent from training
    counts = torch.tensor([6.0, 2.0, 2.0, 0.0])
    assert torch.allclose(w * counts, torch.full((4,), 10 / 3).where(counts > 0, torch.zeros(4)))


def test_augment_moves_image_and_mask_together_and_is_seeded():
    import random

    from echocare_dist.finetune.augment import augment

    mask = _box_mask(64, 64, 16, 20, 24, 20, value=1).astype(np.int64)
    img = mask.astype(np.float32) * 0.8 + 0.1
    out, moved = augment(img, mask, random.Random(3))
    assert not np.array_equal(moved, mask)  # something moved
    agree = ((out > 0.45) == (moved > 0)).mean()
    assert agree > 0.97, agree
    again, moved2 = augment(img, mask, random.Random(3))
    assert np.array_equal(out, again) and np.array_equal(moved, moved2)
    assert out.min() >= 0.0 and out.max() <= 1.0


# ------------------------------------------------------------------------------ baseline, figures
@pytest.mark.slow
def test_pixel_baselines_learn_easy_tasks(tmp_path):
    from echocare_dist.finetune import baseline as B
    from echocare_dist.finetune.data import Sample
    from echocare_dist.finetune.metrics import auc_ovr

    rng = np.random.default_rng(6)
    cls = []
    for i in range(24):
        label = i % 2
        cls.append(Sample(_save(_speckle(rng, 48, 48, 70 + 90 * label), tmp_path / f"c{i}.png"), label, f"c{i}"))
    d = B.classification_baseline(cls[:16], cls[16:], 2, balanced=True)
    assert auc_ovr(d["y_true"], d["probs"]) == 1.0

    seg = []
    for i in range(8):
        m = _box_mask(48, 48, 4 + 3 * i, 6 + 2 * i, 16, 16)
        img = np.clip((50 + 150 * (m > 0)) * rng.gamma(8.0, 1 / 8.0, m.shape), 0, 255).astype(np.uint8)
        seg.append(Sample(_save(img, tmp_path / f"s{i}.png"), _save(m, tmp_path / f"s{i}_mask.png"), f"s{i}"))
    d = B.segmentation_baseline(seg[:6], seg[6:], 2, "binary", 2.0)
    assert d["dices"].shape == (2, 1) and d["dices"].mean() > 0.8

    reg = [Sample(s.image, 10.0 + 5 * s.target, s.key) for s in cls]
    d = B.regression_baseline(reg[:16], reg[16:])
    assert np.abs(d["true"] - d["pred"]).mean() < 2.5  # targets are 10 or 15: chance MAE is 2.5


def test_roc_points_and_figures(tmp_path):
    import cv2

    from echocare_dist.finetune import plots

    fpr, tpr = plots.roc_points(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.3, 0.1]))
    assert fpr.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    fpr, tpr = plots.roc_points(np.array([1, 0]), np.array([0.5, 0.5]))  # a tie is one diagonal step
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    p = plots.confusion_png(np.array([[3, 1], [0, 4]]), ["benign", "malignant"], tmp_path / "cm.png")
    assert cv2.imread(str(p)).shape[:2] == (60 + 2 * 70 + 40, 150 + 2 * 70 + 20)
    gray = np.full((30, 30), 100, np.uint8)
    ids = _box_mask(30, 30, 5, 5, 10, 10, value=1)
    p = plots.overlay_png([(gray, ids, np.zeros_like(ids), "case 1")], tmp_path / "ov.png")
    sheet = cv2.imread(str(p))
    assert (sheet[..., 1] == 200).any()  # the green ground-truth outline is drawn
