"""Fine-tuning that can be trusted (issue 13): random-init baseline, export-derived defaults,
`echocare evaluate` (pretrained vs random vs raw pixels, one table), K-fold cross-validation,
early stopping, final metrics with CIs, figures logged to MLflow. Small generated data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_helpers import exported  # noqa: F401 - fixtures are found by name

from echocare_dist.config import load_config


def _speckle(rng, h, w, level) -> np.ndarray:
    return np.clip(level * rng.gamma(4.0, 0.25, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """Two classes by brightness, with BUSI-style masks in the class folders (must be skipped)."""
    root = tmp_path_factory.mktemp("cls") / "breast set"
    rng = np.random.default_rng(0)
    for cls, level in (("benign", 170), ("malignant", 70)):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(_speckle(rng, 48, 64, level)).save(root / cls / f"{cls} ({i}).png")
            m = np.zeros((48, 64), np.uint8)
            m[10:30, 10:30] = 255
            Image.fromarray(m).save(root / cls / f"{cls} ({i})_mask.png")
    return root


def _cfg(tmp_path: Path, exported: Path, *overrides: str):
    return load_config("tiny_cpu", [f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'run'}",
                                    "finetune.epochs=1", "finetune.warmup_epochs=0", "tracking.enabled=false",
                                    "finetune.bootstrap=200", *overrides])


def test_random_init_is_the_export_architecture_untrained_and_sizes_come_from_the_export(tmp_path, exported,
                                                                                          classes):
    from safetensors.torch import load_file

    from echocare_dist.finetune.runner import Finetuner

    saved = load_file(str(exported))
    pre = Finetuner(_cfg(tmp_path, exported, f"finetune.data={classes}"))
    rnd = Finetuner(_cfg(tmp_path, exported, f"finetune.data={classes}", "finetune.init=random"))
    meta = json.loads(exported.with_name("encoder.json").read_text())
    assert pre.img_size == rnd.img_size == meta["img_size"]  # tiny preset sets no finetune.img_size
    pre_state, rnd_state = pre.model.encoder.state_dict(), rnd.model.encoder.state_dict()
    assert set(rnd_state) == set(pre_state) and all(rnd_state[k].shape == pre_state[k].shape for k in pre_state)
    assert all(torch.equal(pre_state[k], v) for k, v in saved.items())
    weights = [k for k in saved if k.endswith("qkv.weight")]
    assert weights and not any(torch.equal(rnd_state[k], saved[k]) for k in weights)
    assert pre.task_data.skipped["mask_like_name"] and len(pre.task_data.samples) == 16
    explicit = Finetuner(_cfg(tmp_path, exported, f"finetune.data={classes}", "finetune.img_size=128"))
    assert explicit.img_size == 128 and explicit.train_set[0]["image"].shape[-1] == 128


@pytest.mark.slow
def test_evaluate_prints_one_table_with_the_three_methods(tmp_path, exported, classes, capsys):
    from mlflow import MlflowClient

    from echocare_dist.cli import main

    args = [f"--set={o}" for o in (f"finetune.checkpoint={exported}", f"finetune.data={classes}",
                                   f"finetune.run_dir={tmp_path / 'eval'}", "finetune.epochs=2",
                                   "finetune.bootstrap=200", "finetune.val_fraction=0.25", "tracking.enabled=true")]
    assert main(["evaluate", "--config", "tiny_cpu", *args]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "eval" / "evaluate.txt").read_text()
    assert table.strip() in out  # printed as written
    head = [line for line in table.splitlines() if line.startswith("method")][0].split()
    assert head == ["method", "accuracy", "macro_f1", "auc"]
    rows = [line for line in table.splitlines() if line.startswith(("pretrained", "random init", "logreg"))]
    assert [r.split()[0] for r in rows] == ["pretrained", "random", "logreg"]
    summary = json.loads((tmp_path / "eval" / "evaluate.json").read_text())
    assert summary["skipped"] == {"mask_like_name": 16}
    for name, finals in summary["rows"].items():
        f = finals[0]
        lo, hi = f["auc_ci"]
        assert lo <= f["auc"] <= hi or np.isnan(lo), (name, f)
    # every fine-tuned run trained on the same split
    splits = {init: (tmp_path / "eval" / init / "split.csv").read_text() for init in ("pretrained", "random")}
    assert splits["pretrained"] == splits["random"]
    run = tmp_path / "eval" / "random"
    metrics = json.loads((run / "metrics.json").read_text())
    figures = {"confusion.png", "roc.png", "curves.png"}
    assert metrics["init"] == "random" and set(metrics["final"]["figures"]) == figures
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(metrics["mlflow_run_id"])}
    assert {"confusion.png", "roc.png", "curves.png", "metrics.json"} <= logged


@pytest.mark.slow
def test_folds_and_early_stopping(tmp_path, exported, classes):
    from echocare_dist.finetune.runner import run_finetune

    # lr so small that the monitor cannot move: epoch 1 stays best, patience 1 stops after epoch 2
    cfg = _cfg(tmp_path, exported, f"finetune.data={classes}", "finetune.folds=2", "finetune.epochs=5",
               "finetune.early_stop_patience=1", "finetune.lr=1e-12", "finetune.min_lr=1e-12",
               "finetune.augment=false", "finetune.hflip_prob=0", "finetune.drop_path_rate=0",
               "finetune.balance=sampler")
    summary = run_finetune(cfg)
    cv = json.loads((tmp_path / "run" / "cv.json").read_text())
    assert cv["folds"] == 2 == len(cv["per_fold"]) and set(cv["metrics"]) == {"accuracy", "macro_f1", "auc"}
    accs = [f["final"]["accuracy"] for f in cv["per_fold"]]
    assert cv["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["metrics"]["accuracy"]["std"] == pytest.approx(np.std(accs))
    assert summary["metrics"] == cv["metrics"]
    vals = []
    for k in (1, 2):
        rows = (tmp_path / "run" / f"fold_{k}" / "split.csv").read_text().splitlines()[1:]
        vals += [r.rsplit(",", 1)[0] for r in rows if r.endswith(",val")]
        fold = json.loads((tmp_path / "run" / f"fold_{k}" / "metrics.json").read_text())
        assert fold["stopped_early"] and len(fold["history"]) == 2 and fold["best_epoch"] == 1
    assert len(vals) == len(set(vals)) == 16  # the folds' validation sets partition the data


@pytest.mark.slow
def test_evaluate_segmentation_reports_both_dice_conventions(tmp_path, exported):
    from echocare_dist.finetune.evaluate import run_evaluate

    root = tmp_path / "busi-like"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        m = np.zeros((48, 64), np.uint8)
        if i % 3:  # every third case is normal: an empty mask
            r, c = rng.integers(4, 24), rng.integers(4, 36)
            m[r:r + 18, c:c + 22] = 255
        img = np.clip((60 + 120 * (m > 0)) * rng.gamma(4.0, 0.25, m.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"case ({i}).png")
        Image.fromarray(m).save(root / f"case ({i})_mask.png")
    summary = run_evaluate(_cfg(tmp_path, exported, "finetune.task=segmentation", f"finetune.data={root}",
                                "finetune.val_fraction=0.34", "finetune.lr=3e-3"))
    assert summary["skipped"] == {"empty_mask_kept": 4}
    for name, (final,) in summary["rows"].items():
        assert {"dice", "dice_lesion", "nsd", "nsd_lesion"} <= set(final)
        n_empty = final["empty_images"]
        assert final["lesion_images"] + n_empty == 4
    assert "dice_lesion" in summary["table"] and (tmp_path / "run" / "pretrained" / "overlays.png").is_file()


def _arm(metric: str, value: float, lo: float, hi: float) -> list[dict]:
    return [{metric: value, f"{metric}_ci": [lo, hi]}]


@pytest.mark.parametrize("task, metric, tuned, base, word", [
    ("landmarks", "mre", (3.0, 2.5, 3.5), (5.5, 5.2, 5.8), "beats"),          # errors: lower is better
    ("landmarks", "mre", (5.4, 4.0, 6.0), (5.5, 5.2, 5.8), "a tie (95% CIs overlap)"),
    ("landmarks", "mre", (8.0, 7.0, 9.0), (5.5, 5.2, 5.8), "it loses to"),
    ("detection", "box_ap", (0.6, 0.55, 0.65), (0.2, 0.1, 0.3), "beats"),
    ("detection", "box_ap", (0.25, 0.05, 0.45), (0.2, 0.1, 0.3), "a tie (95% CIs overlap)"),
    ("detection", "box_ap", (0.05, 0.0, 0.08), (0.2, 0.1, 0.3), "it loses to"),
])
def test_verdict_says_beats_only_when_the_intervals_are_apart(task, metric, tuned, base, word):
    from echocare_dist.finetune.evaluate import verdict

    rows = {"pretrained": _arm(metric, *tuned), "random init": _arm(metric, tuned[0] * 1.5 if metric == "mre" else
                                                                    tuned[0] / 2, 0.0, 99.0),
            "reference": _arm(metric, *base)}
    line = verdict(rows, task, "reference")
    assert line.startswith(f"{metric}: best fine-tuned (pretrained) {tuned[0]:.3f} vs reference {base[0]:.3f}: ")
    assert word in line and ("beats" in line) == (word == "beats")


def test_verdict_over_folds_uses_mean_and_std_and_refuses_without_intervals():
    from echocare_dist.finetune.evaluate import verdict

    def folds(*values):
        return [{"mre": v} for v in values]
    apart = {"pretrained": folds(2.0, 2.2), "random init": folds(9.0, 9.0), "reference": folds(5.0, 5.4)}
    assert "beats the pixel baseline (mean +- std over folds apart)" in verdict(apart, "landmarks", "reference")
    close = {"pretrained": folds(4.0, 6.0), "random init": folds(9.0, 9.0), "reference": folds(5.0, 5.4)}
    assert "a tie (mean +- std over folds overlap)" in verdict(close, "landmarks", "reference")
    no_ci = {"pretrained": [{"mre": 1.0}], "random init": [{"mre": 2.0}], "reference": [{"mre": 5.0}]}
    line = verdict(no_ci, "landmarks", "reference")
    assert "no verdict" in line and "beats" not in line


def test_table_leaves_out_a_metric_no_method_has():
    from echocare_dist.finetune.evaluate import format_table

    def final(ap, mask_ap):
        return [dict(box_ap=ap, box_ap_ci=[ap - 0.1, ap + 0.1], box_ap50=ap, box_ap50_ci=[ap, ap],
                     mask_ap=mask_ap, mask_ap_ci=[mask_ap, mask_ap], mask_ap50=mask_ap, mask_ap50_ci=[mask_ap, mask_ap])]
    boxes_only = format_table({"pretrained": final(0.5, float("nan")), "mean box": final(0.2, float("nan"))},
                              "detection", 1, "header")
    head = [line for line in boxes_only.splitlines() if line.startswith("method")][0].split()
    assert head == ["method", "box_ap", "box_ap50"] and "nan" not in boxes_only
    with_masks = format_table({"pretrained": final(0.5, 0.4), "mean box": final(0.2, 0.1)}, "detection", 1, "header")
    assert [line for line in with_masks.splitlines() if line.startswith("method")][0].split()[1:] == \
        ["box_ap", "box_ap50", "mask_ap", "mask_ap50"]
    assert "0.400 [0.400, 0.400]" in with_masks
