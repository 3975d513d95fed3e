"""`echocare evaluate`: pretrained vs random init vs a raw-pixel baseline, on one split (SPEC 9).

The data is discovered and split once (group-aware; with `finetune.folds: K`, K folds), then on
every split: the encoder fine-tuned from the export (`init=pretrained`), the same architecture
from scratch (`init=random`, same recipe), and the linear raw-pixel baseline of baseline.py.
Writes to `finetune.run_dir`: pretrained/ and random/ (ordinary fine-tuning runs, per fold with
folds), evaluate.json and evaluate.txt (the table, also printed). Figures are the best
checkpoint's, with 95% bootstrap CIs for one split and mean +- std over folds for K >= 2.
"""
from __future__ import annotations

import copy
import logging
import math

from ..atomic import atomic_write_json, atomic_write_text
from ..config import Config, save_resolved
from . import baseline as B
from . import metrics as M
from .crossval import aggregate
from .discovery import discover
from .report import metrics_with_ci
from .runner import DEFAULT_MONITOR, TASK_METRICS, Finetuner
from .splits import splits_for
from .tasks import TASK_SPECS

log = logging.getLogger(__name__)

BASELINE_NAME = {"classification": f"logreg {B.PIXELS}x{B.PIXELS} px", "regression": f"ridge {B.PIXELS}x{B.PIXELS} px",
                 "segmentation": f"pixel logreg {B.PATCH}x{B.PATCH}"}
SHOWN = {"classification": ("accuracy", "macro_f1", "auc"),
         "segmentation": ("dice", "dice_lesion", "nsd", "nsd_lesion"), "regression": ("mae",)}
BASELINE_NAME.update({name: spec.baseline_name for name, spec in TASK_SPECS.items()})
SHOWN.update({name: spec.metrics for name, spec in TASK_SPECS.items()})


def _baseline(task: str, train, val, runner: Finetuner, ft) -> dict:
    if task in TASK_SPECS:
        details = TASK_SPECS[task].baseline(train, val, runner)
    elif task == "classification":
        details = B.classification_baseline(train, val, runner.num_outputs, ft.balance != "none")
    elif task == "segmentation":
        details = B.segmentation_baseline(train, val, runner.num_outputs, runner.mask_mode, ft.nsd_tolerance)
    else:
        details = B.regression_baseline(train, val)
    return metrics_with_ci(task, details, runner.num_outputs, ft.bootstrap, ft.seed)


def _cell(finals: list[dict], metric: str) -> str:
    if len(finals) == 1:
        f = finals[0]
        lo, hi = f.get(f"{metric}_ci", [math.nan, math.nan])
        return f"{f[metric]:.3f} [{lo:.3f}, {hi:.3f}]"
    agg = aggregate(finals, (metric,))[metric]
    return f"{agg['mean']:.3f} +- {agg['std']:.3f}"


def format_table(rows: dict[str, list[dict]], task: str, folds: int, header: str) -> str:
    # a metric no row has (detection's mask AP without mask annotations) is left out, not shown as NaN
    metrics = [m for m in SHOWN[task] if any(not math.isnan(f.get(m, math.nan)) for fs in rows.values() for f in fs)] \
        or list(SHOWN[task])
    name_w = max(len(n) for n in rows) + 2
    cells = {n: [_cell(f, m) for m in metrics] for n, f in rows.items()}
    col_w = [max(len(m), *(len(c[i]) for c in cells.values())) + 2 for i, m in enumerate(metrics)]
    how = "value [95% bootstrap CI]" if folds == 1 else f"mean +- std over {folds} folds"
    lines = [header, f"({how}; lesion = images whose ground truth is empty left out)" if task == "segmentation"
             else f"({how})", "method".ljust(name_w) + "".join(m.rjust(w) for m, w in zip(metrics, col_w))]
    for n, c in cells.items():
        lines.append(n.ljust(name_w) + "".join(v.rjust(w) for v, w in zip(c, col_w)))
    return "\n".join(lines)


def interval(finals: list[dict], metric: str) -> tuple[float, float]:
    """The 95% bootstrap CI of one split, or mean +- std over folds (NaN when not computed)."""
    if len(finals) == 1:
        lo, hi = finals[0].get(f"{metric}_ci", [math.nan, math.nan])
        return float(lo), float(hi)
    agg = aggregate(finals, (metric,))[metric]
    return agg["mean"] - agg["std"], agg["mean"] + agg["std"]


def verdict(rows: dict[str, list[dict]], task: str, baseline_name: str) -> str:
    """"beats" only when the best fine-tuned arm's interval lies wholly on the better side of the
    baseline's (below it for errors), "loses" when wholly on the worse side, else a tie: a margin
    inside overlapping CIs is not a result."""
    metric = DEFAULT_MONITOR[task]
    lower = metric in M.LOWER_IS_BETTER
    score = {n: aggregate(f, (metric,))[metric]["mean"] for n, f in rows.items()}
    tuned = {n: v for n, v in score.items() if n != baseline_name and not math.isnan(v)}
    if not tuned or math.isnan(score[baseline_name]):
        return f"{metric}: not comparable (undefined on this validation set)"
    best = min(tuned, key=tuned.get) if lower else max(tuned, key=tuned.get)
    (t_lo, t_hi), (b_lo, b_hi) = interval(rows[best], metric), interval(rows[baseline_name], metric)
    how = "95% CIs" if len(rows[best]) == 1 else "mean +- std over folds"
    head = f"{metric}: best fine-tuned ({best}) {tuned[best]:.3f} vs {baseline_name} {score[baseline_name]:.3f}: "
    if any(math.isnan(v) for v in (t_lo, t_hi, b_lo, b_hi)):
        return head + f"no {how} to compare (finetune.bootstrap=0 or too few images): no verdict"
    better, worse = (t_hi < b_lo, t_lo > b_hi) if lower else (t_lo > b_hi, t_hi < b_lo)
    if better:
        return head + f"the fine-tuned model beats the pixel baseline ({how} apart)"
    outcome = "it loses to" if worse else f"a tie ({how} overlap) with"
    return head + outcome + (
        " the pixel baseline: read this as a problem of the recipe (epochs, lr, img_size, balance, augmentation) "
        "or of too little / too easy data, not as a result")


def run_evaluate(cfg: Config) -> dict:
    ft = cfg.finetune
    out = cfg.resolve_path(ft.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    task = discover(ft, cfg.resolve_path)
    splits = splits_for(task, ft, cfg.resolve_path)
    names = {"pretrained": "pretrained", "random": "random init"}
    base_name = BASELINE_NAME[ft.task]
    rows: dict[str, list[dict]] = {names["pretrained"]: [], names["random"]: [], base_name: []}
    for k, split in enumerate(splits):
        sub = [f"fold_{k + 1}"] if len(splits) > 1 else []
        runner = None
        for init in ("pretrained", "random"):
            c = copy.deepcopy(cfg)
            c.finetune.init = init
            runner = Finetuner(c, task=task, split=split, run_dir=out.joinpath(init, *sub))
            rows[names[init]].append(runner.run()["final"])
        log.info("pixel baseline (%s) on split %d/%d", base_name, k + 1, len(splits))
        rows[base_name].append(_baseline(ft.task, split[0], split[1], runner, ft))
    folds = f", {len(splits)} folds" if len(splits) > 1 else ""
    header = (f"echocare evaluate: {ft.task} on {task.root} ({len(task.samples)} samples, "
              f"{len(splits[0][0])} train / {len(splits[0][1])} val{folds}; {ft.mode} fine-tuning, "
              f"{ft.epochs} epochs max)")
    table = format_table(rows, ft.task, len(splits), header) + "\n" + verdict(rows, ft.task, base_name)
    atomic_write_text(out / "evaluate.txt", table + "\n")
    summary = dict(task=ft.task, folds=len(splits), metrics=list(TASK_METRICS[ft.task]), rows=rows, table=table,
                   skipped={k: len(v) for k, v in task.skipped.items()}, run_dir=str(out))
    atomic_write_json(out / "evaluate.json", summary)
    print("\n" + table, flush=True)
    return summary

