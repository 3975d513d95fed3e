"""K-fold cross-validation (`finetune.folds: K`, the report uses 5): data discovered and grouped
once, whole duplicate groups per fold (splits.py), one fine-tuning run per fold in
`run_dir/fold_K/`, and `run_dir/cv.json` with each fold's final metrics and their mean +- std
(population std over folds; with K folds it says how much the figure moves with the split).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..atomic import atomic_write_json
from ..config import Config, save_resolved
from .discovery import discover
from .splits import make_splits

log = logging.getLogger(__name__)


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


def aggregate(finals: list[dict], metrics: tuple[str, ...]) -> dict:
    return {m: dict(zip(("mean", "std"), mean_std([f.get(m, math.nan) for f in finals]))) for m in metrics}


def format_cv(agg: dict, folds: int) -> str:
    return f"{folds}-fold cross-validation: " + ", ".join(f"{m} {v['mean']:.4f} +- {v['std']:.4f}"
                                                           for m, v in agg.items())


def run_crossval(cfg: Config, run_one, metrics: tuple[str, ...]) -> dict:
    """`run_one(task, split, run_dir) -> summary` is one fine-tuning run (runner.py passes it in,
    so this module does not import the runner that calls it)."""
    ft = cfg.finetune
    run_dir = cfg.resolve_path(ft.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    task = discover(ft, cfg.resolve_path)
    splits = make_splits(task, ft)
    folds = []
    for k, split in enumerate(splits):
        log.info("fold %d/%d: %d train / %d val", k + 1, len(splits), len(split[0]), len(split[1]))
        folds.append(run_one(task, split, run_dir / f"fold_{k + 1}"))
    agg = aggregate([f["final"] or {} for f in folds], metrics)
    summary = dict(task=ft.task, init=ft.init, folds=len(splits), metrics=agg,
                   per_fold=[dict(fold=k + 1, num_train=f["num_train"], num_val=f["num_val"],
                                  best_epoch=f["best_epoch"], final=f["final"]) for k, f in enumerate(folds)],
                   run_dir=str(run_dir))
    atomic_write_json(run_dir / "cv.json", summary)
    print(format_cv(agg, len(splits)))
    return summary
