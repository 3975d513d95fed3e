"""What a fine-tuning task beyond classification / segmentation / regression provides.

The runner (runner.py) keeps its loop, optimizer, checkpoints, tracking and split handling; a
`TaskSpec` supplies the parts that differ per task: discovery of the annotations, the dataset's
targets, the dense head's loss, validation metrics with bootstrap CIs, figures and a cheap
reference baseline for `echocare evaluate`. Every task here predicts dense maps at the input
resolution with the repository's multi-scale decoder (model.SegmentationModel), so the head is
the same module with a task-specific number of output channels.
"""
from __future__ import annotations

import csv
import random
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import DataError, read_gray, resize_gray


class TaskSpec(ABC):
    name: str = ""
    metrics: tuple[str, ...] = ()          # shown in tables, with 95% CIs
    monitor: str = ""                      # default metric that picks the best epoch
    lower_is_better: frozenset[str] = frozenset()
    baseline_name: str = ""

    @abstractmethod
    def discover(self, ft, root: Path, csv_path: Path | None):
        """TaskData of every annotated sample; malformed annotations raise DataError naming the file."""

    @abstractmethod
    def num_outputs(self, task, ft) -> int:
        """Output channels of the dense head."""

    @abstractmethod
    def dataset(self, samples, train: bool, ft, common: dict) -> Dataset:
        """Items dict(image, index, target tensor); `common` holds ImageDataset's arguments."""

    @abstractmethod
    def loss(self, out: torch.Tensor, target: torch.Tensor, ft) -> torch.Tensor:
        """Scalar training loss of the head's (B, num_outputs, S, S) output."""

    @abstractmethod
    def evaluate(self, runner, model, keep: int) -> tuple[dict, dict]:
        """(metrics, per-image details) of `model` on `runner.val_loader`."""

    @abstractmethod
    def final(self, details: dict, resamples: int, seed: int) -> dict:
        """{metric: value, metric_ci: [low, high]} from evaluate's or baseline's details."""

    @abstractmethod
    def figures(self, runner, details: dict) -> list[Path]:
        """PNGs written into runner.run_dir."""

    @abstractmethod
    def baseline(self, train, val, runner) -> dict:
        """Per-image details of the task's reference predictor (same shape as evaluate's)."""

    def decoder_dim(self, ft, encoder_meta: dict) -> int:
        """Width of the dense head's decoder."""
        return ft.seg_decoder_dim

    def init_head(self, model, export_weights: Path, init: str, task) -> None:
        """Start the head from weights the export carries, or set its prior (`task`: the TaskData);
        the default keeps the decoder's own initialisation."""
        return None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (annotations are checked against it)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV; every row must have the header's column count."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise DataError(f"cannot read CSV {path}: {exc.strerror}") from exc
    if not rows:
        raise DataError(f"CSV {path} is empty")
    header = [h.strip() for h in rows[0]]
    body = []
    for line, cells in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue
        if len(cells) != len(header):
            raise DataError(f"CSV {path} line {line}: {len(cells)} columns, the header has {len(header)} "
                            f"({','.join(header)})")
        body.append((line, cells))
    if not body:
        raise DataError(f"CSV {path} has no rows")
    return header, body


def number(text: str, what: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{where}: {what} {text!r} is not a number") from None
    if not np.isfinite(v):
        raise DataError(f"{where}: {what} {text!r} is not finite")
    return v


def resolve_image(base: Path, rel: str, where: str) -> Path:
    p = Path(rel).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise DataError(f"{where}: image {rel!r} not found (looked at {p})")
    return p


def sample_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class ImageDataset(Dataset):
    """Gray image resized to img_size, normalised, channels expanded; subclasses add targets.
    Randomness is seeded per (seed, epoch, sample): identical with any number of workers."""

    def __init__(self, samples, train: bool, img_size: int, in_chans: int, norm_mean: float, norm_std: float,
                 seed: int = 0, hflip_prob: float = 0.0, **_unused):
        self.samples, self.train, self.size, self.in_chans = samples, train, img_size, in_chans
        self.mean, self.std, self.seed, self.hflip_prob = norm_mean, norm_std, seed, hflip_prob
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> random.Random:
        # validation draws do not depend on the epoch: the same degraded input every evaluation
        return random.Random(hash((self.seed, self.epoch if self.train else -1, index)))

    def load(self, path: Path) -> np.ndarray:
        """(S, S) float32 in [0, 1]."""
        return resize_gray(read_gray(path), self.size).astype(np.float32) / 255.0

    def to_input(self, img01: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy((np.ascontiguousarray(img01, dtype=np.float32) - self.mean) / self.std)[None]
        return x.expand(self.in_chans, -1, -1).clone() if self.in_chans > 1 else x
