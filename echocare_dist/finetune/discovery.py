"""Finding the labeled samples of a fine-tuning task, and the user's split file.

The layouts are described in data.py; segmentation folders are paired in pairing.py. Files left
out are never dropped silently: each reason is counted, logged with examples, and stored in
metrics.json (`skipped`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import ConfigError
from ..curation.masklike import is_mask_like_image, is_mask_like_name
from .data import (DataError, Sample, TaskData, class_order, images_under, read_csv, read_gray,
                   resolve_csv_path)
from .pairing import check_masks, discover_segmentation_folders
from .tasks import TASK_SPECS

log = logging.getLogger(__name__)


def _class_folder_images(folder: Path, root: Path, skip_mask_like: bool,
                         skipped: dict[str, list[str]]) -> list[Path]:
    """Images of one class folder; mask files (curation rule: by name, then by content) left out."""
    if not skip_mask_like:
        return images_under(folder)
    kept = []
    for p in images_under(folder):
        rel = p.relative_to(root).as_posix()
        if is_mask_like_name(p):
            skipped.setdefault("mask_like_name", []).append(rel)
        elif is_mask_like_image(read_gray(p)):
            skipped.setdefault("mask_like_content", []).append(rel)
        else:
            kept.append(p)
    return kept


def log_skipped(skipped: dict[str, list[str]]) -> None:
    for reason, paths in sorted(skipped.items()):
        shown = "; ".join(paths[:3]) + ("; ..." if len(paths) > 3 else "")
        level = logging.INFO if reason.endswith("_kept") else logging.WARNING
        log.log(level, "%s: %d file(s)%s, e.g. %s", reason, len(paths),
                " (kept)" if reason.endswith("_kept") else " left out", shown)


def discover(ft, resolve_path) -> TaskData:
    """All labeled samples of the task, in a deterministic order."""
    data = resolve_path(ft.data) if ft.data else None
    csv_path = resolve_path(ft.csv) if ft.csv else None
    if data is None and csv_path is None:
        raise ConfigError("finetune.data or finetune.csv must be set")
    if data is not None and not data.is_dir():
        raise ConfigError(f"finetune.data={ft.data!r} is not a directory")
    root = data if data is not None else csv_path.parent
    skipped: dict[str, list[str]] = {}
    if ft.task in TASK_SPECS:  # landmarks, detection, enhancement: the spec reads its own annotations
        task = TASK_SPECS[ft.task].discover(ft, root, csv_path)
        log_skipped(task.skipped)
        return task

    if ft.task == "classification":
        if csv_path is not None:  # rows the user listed are taken as given
            rows = read_csv(csv_path, ("path", "label"))
            names = class_order([label for _, label in rows])
            index = {n: i for i, n in enumerate(names)}
            samples = [Sample(resolve_csv_path(root, p, "image", csv_path), index[label], p) for p, label in rows]
        else:
            class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            per_class = [(d, _class_folder_images(d, root, ft.skip_mask_like, skipped)) for d in class_dirs]
            per_class = [(d, imgs) for d, imgs in per_class if imgs]
            if len(per_class) < 2:
                raise DataError(f"{root}: classification needs one sub-folder of images per class "
                                f"(found {len(per_class)} with images)")
            names = [d.name for d, _ in per_class]
            samples = [Sample(img, i, img.relative_to(root).as_posix())
                       for i, (_, imgs) in enumerate(per_class) for img in imgs]
        log_skipped(skipped)
        return TaskData(samples, names, root, skipped)

    if ft.task == "regression":
        if csv_path is None:
            raise ConfigError("finetune.task=regression needs finetune.csv (columns path,value)")
        samples = []
        for p, value in read_csv(csv_path, ("path", "value")):
            try:
                v = float(value)
            except ValueError:
                raise DataError(f"CSV {csv_path}: value {value!r} of {p!r} is not a number") from None
            if v != v or v in (float("inf"), float("-inf")):
                raise DataError(f"CSV {csv_path}: value {value!r} of {p!r} is not finite")
            samples.append(Sample(resolve_csv_path(root, p, "image", csv_path), v, p))
        return TaskData(samples, None, root)

    # segmentation
    if csv_path is not None:
        samples = [Sample(resolve_csv_path(root, p, "image", csv_path), resolve_csv_path(root, m, "mask", csv_path), p)
                   for p, m in read_csv(csv_path, ("path", "mask"))]
    else:
        samples, skipped = discover_segmentation_folders(root, ft)
    samples, values, mask_skips = check_masks(samples, ft, root)
    skipped.update(mask_skips)
    log_skipped(skipped)
    return TaskData(samples, None, root, skipped, values)


def read_split_file(task: TaskData, path: Path) -> tuple[list[Sample], list[Sample]]:
    """(train, val) as a split file (`path,split`, other split names ignored) assigns them."""
    assignment = dict(read_csv(path, ("path", "split")))
    by_key = {s.key: s for s in task.samples}
    left_out = {p for paths in task.skipped.values() for p in paths}
    unknown = [k for k in assignment if k not in by_key and k not in left_out]
    if unknown:
        raise DataError(f"split file {path} names {len(unknown)} path(s) that are not in the data, "
                        f"e.g. {unknown[0]!r} (paths are relative to {task.root})")
    train = [s for s in task.samples if assignment.get(s.key) == "train"]
    val = [s for s in task.samples if assignment.get(s.key) == "val"]
    if not train or not val:
        raise DataError(f"split file {path} leaves {len(train)} training and {len(val)} validation samples "
                        f"(of {len(task.samples)}); both must be non-empty")
    return train, val
