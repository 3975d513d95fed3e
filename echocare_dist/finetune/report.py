"""The final word on a fine-tuning run: the best checkpoint's validation metrics with 95%
bootstrap CIs (resampling validation images), and its figures.

`final` in metrics.json holds `{metric: value}` and `{metric}_ci: [low, high]` for the task's
metrics (metrics.py states their conventions); the PNGs are logged to MLflow with the run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import metrics as M
from . import plots
from .data import read_gray
from .tasks import TASK_SPECS

log = logging.getLogger(__name__)

OVERLAY_IMAGES = 8  # validation images drawn in overlays.png


def _classification(details: dict, num_classes: int, resamples: int, seed: int) -> dict:
    y, probs = details["y_true"], details["probs"]

    def acc(yy, pp):
        return M.accuracy(yy, pp.argmax(axis=1))

    def f1(yy, pp):
        return M.macro_f1(yy, pp.argmax(axis=1), num_classes)

    out = {}
    for name, fn in (("accuracy", acc), ("macro_f1", f1), ("auc", M.auc_ovr)):
        out[name] = fn(y, probs)
        out[f"{name}_ci"] = list(M.bootstrap_ci(fn, [y, probs], resamples, seed))
    return out


def _segmentation(details: dict, resamples: int, seed: int) -> dict:
    d, s, t = details["dices"], details["nsds"], details["has_target"]
    out = M.segmentation_summary(d, s, t)
    for name in ("dice", "nsd", "dice_lesion", "nsd_lesion"):
        def fn(dd, ss, tt, name=name):
            return M.segmentation_summary(dd, ss, tt)[name]
        out[f"{name}_ci"] = list(M.bootstrap_ci(fn, [d, s, t], resamples, seed))
    out["lesion_images"] = int(t.any(axis=1).sum())
    out["empty_images"] = int((~t.any(axis=1)).sum())
    return out


def _regression(details: dict, resamples: int, seed: int) -> dict:
    true, pred = details["true"], details["pred"]
    return dict(mae=M.mae(true, pred), mae_ci=list(M.bootstrap_ci(M.mae, [true, pred], resamples, seed)))


def figures(runner, details: dict) -> list[Path]:
    """The task's PNGs in the run directory."""
    run_dir, paths = runner.run_dir, []
    if runner.ft.task in TASK_SPECS:
        return TASK_SPECS[runner.ft.task].figures(runner, details)
    if runner.ft.task == "classification":
        y, probs = details["y_true"], details["probs"]
        k = probs.shape[1]
        names = list(runner.class_names) + [f"class {i}" for i in range(len(runner.class_names), k)]
        paths.append(plots.confusion_png(M.confusion_matrix(y, probs.argmax(axis=1), k), names,
                                         run_dir / "confusion.png"))
        aucs = [M.binary_auc(y == c, probs[:, c]) for c in range(k)]
        paths.append(plots.roc_png(y, probs, names, aucs, run_dir / "roc.png"))
    elif runner.ft.task == "segmentation":
        items = []
        for sample, (truth, pred), dice_row in zip(runner.val_set.samples, details["kept"], details["dices"]):
            caption = f"{Path(sample.key).name} Dice {np.mean(dice_row):.2f}"
            items.append((read_gray(sample.image), truth, pred, caption))
        paths.append(plots.overlay_png(items, run_dir / "overlays.png"))
    return paths


def final_report(runner) -> dict:
    """Evaluate `runner.model` (holding the best weights) once more, with CIs and figures."""
    ft = runner.ft
    runner.evaluate(keep=OVERLAY_IMAGES)
    final = metrics_with_ci(ft.task, runner.details, runner.num_outputs, ft.bootstrap, ft.seed)
    final["figures"] = [p.name for p in figures(runner, runner.details)]
    return final


def metrics_with_ci(task: str, details: dict, num_classes: int, resamples: int, seed: int) -> dict:
    """The task's metrics and their CIs from per-image `details` (runner or baseline)."""
    if task in TASK_SPECS:
        return TASK_SPECS[task].final(details, resamples, seed)
    if task == "classification":
        return _classification(details, num_classes, resamples, seed)
    if task == "segmentation":
        return _segmentation(details, resamples, seed)
    return _regression(details, resamples, seed)


def format_final(final: dict, metrics: tuple[str, ...]) -> str:
    parts = []
    for m in metrics:
        lo, hi = final.get(f"{m}_ci", [float("nan")] * 2)
        parts.append(f"{m} {final[m]:.4f} [{lo:.4f}, {hi:.4f}]")
    return "best checkpoint, 95% CI: " + ", ".join(parts)
