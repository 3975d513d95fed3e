"""Labeled downstream data: discovery, train/val split, decoding, resizing.

Layouts (discovery.py and pairing.py find the samples; `finetune.data` is a folder; paths in a
CSV are relative to `finetune.data` when set, else to the CSV's folder; names may contain spaces):
- classification: `data/<class name>/**/<image>` (one sub-folder per class, sorted names give
  the class ids; mask files in them are skipped and counted), or a CSV `path,label`.
- segmentation: `data/images/` + `data/masks/`, masks beside their images (`<stem>_mask.png`,
  several `<stem>_mask_N.png` merged), stems paired by `finetune.image_pattern` /
  `finetune.mask_pattern` (`Test_Image_{id}` / `mask_{id}`), or a CSV `path,mask`.
- regression: a CSV with header `path,value`.

Images: PNG/JPEG/BMP/TIFF of any size and depth, gray or colour; decoded to 8-bit gray (the
curation decoder, so pixels match pretraining), resized to `img_size` x `img_size`.

Masks (may differ from their image in size and file type; resized with nearest neighbour):
- `mask_mode=ids`: pixel value = class id (0 = background); palette PNGs give their indices.
- `mask_mode=binary`: value >= 128 is foreground (0/255 masks, also lossy JPEG masks).
- `mask_mode=auto` (default): binary when every mask holds only 0 and 255, ids when every value
  is below 128, otherwise an error asking to choose.
1-bit masks read as 0/255. Colour masks whose channels differ are refused (encode classes as gray or palette values).
16-bit masks: 0/65535 (or 0 and one other value) read as 0/255, 8-bit data scaled by 257 is
scaled back, values below 256 are kept; anything else is refused with the values found.
"""
from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..atomic import atomic_write_text
from ..curation.media import IMAGE_EXTS, iter_image
from .augment import augment

log = logging.getLogger(__name__)

BINARY_THRESHOLD = 128  # midpoint of 8-bit masks; documented above, not a tunable


class DataError(ValueError):
    """Bad downstream data; the message names the file."""


@dataclass(frozen=True)
class Sample:
    image: Path
    target: object          # class id (int), value (float) or mask path (Path)
    key: str                # path relative to the data root: identifies the sample in split files


@dataclass
class TaskData:
    samples: list[Sample]
    class_names: list[str] | None      # classification
    root: Path
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths left out (counted, logged)
    mask_values: set[int] | None = None  # segmentation: every value in the kept masks
    target_names: list[str] | None = None  # landmarks: point names; detection: box classes


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------
def read_gray(path: Path) -> np.ndarray:
    """(H, W) uint8, whatever the file's depth and colour."""
    try:
        return next(iter_image(Path(path), 1))[1]
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def read_mask_values(path: Path) -> np.ndarray:
    """Raw mask values (H, W) as uint8/uint16: palette indices or gray levels."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "1", "I;16", "I"):
                arr = np.asarray(im)
            elif im.mode in ("LA", "PA"):
                arr = np.asarray(im)[..., 0]
            else:
                rgb = np.asarray(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(f"mask {path} is a colour image with differing channels; save class ids as a "
                                    f"gray or palette image")
                arr = rgb[..., 0]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot decode mask {path}: {type(exc).__name__}: {exc}") from exc
    if arr.dtype == bool:  # a 1-bit image is a binary mask: read it as 0/255 so it mixes with 8-bit ones (BUSI)
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype not in (np.uint8, np.uint16):
        arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"mask {path} holds values outside 0..65535")
        arr = arr.astype(np.uint16)
    if arr.dtype == np.uint16 and arr.max(initial=0) > 255:
        arr = _sixteen_bit_to_8(arr, path)
    return arr


def _sixteen_bit_to_8(arr: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(arr)
    nonzero = values[values > 0]
    if len(nonzero) == 1:  # a binary mask saved at 16 bits (0/65535, 0/1000, ...)
        return np.where(arr > 0, 255, 0).astype(np.uint8)
    if np.all(values % 257 == 0):  # 8-bit levels stretched to 16 bits (v * 257)
        return (arr // 257).astype(np.uint8)
    shown = values[:8].tolist()
    raise DataError(f"16-bit mask {path} holds values {shown}{'...' if len(values) > 8 else ''}: neither binary "
                    f"nor 8-bit levels scaled by 257; save it as an 8-bit gray or palette image")


def read_mask(target) -> np.ndarray:
    """Mask values of a sample: one path, or several masks of one image merged (union of their
    foreground: pixel-wise maximum, at the size of the first mask, nearest neighbour)."""
    paths = list(target) if isinstance(target, (tuple, list)) else [target]
    merged = read_mask_values(paths[0])
    for p in paths[1:]:
        extra = read_mask_values(p)
        if extra.shape != merged.shape:
            extra = cv2.resize(extra, merged.shape[::-1], interpolation=cv2.INTER_NEAREST)
        merged = np.maximum(merged, extra.astype(merged.dtype))
    return merged


def scan_mask_values(targets: list) -> set[int]:
    """Every value that occurs in the masks (read once at start-up: class count and mask mode)."""
    values: set[int] = set()
    for t in targets:
        values.update(int(v) for v in np.unique(read_mask(t)))
    return values


def resolve_mask_mode(values: set[int], mode: str) -> str:
    """`auto` -> binary when only 0/255 occur, ids when every value is below 128, else an error."""
    if mode != "auto":
        return mode
    if values <= {0, 255}:
        return "binary"
    if max(values) < BINARY_THRESHOLD:
        return "ids"
    shown = sorted(values)[:12]
    raise DataError(f"masks hold values {shown}{'...' if len(values) > 12 else ''}: neither class ids (< "
                    f"{BINARY_THRESHOLD}) nor 0/255; set finetune.mask_mode=binary (foreground = value >= "
                    f"{BINARY_THRESHOLD}) or finetune.mask_mode=ids")


def mask_to_ids(values: np.ndarray, mode: str) -> np.ndarray:
    if mode == "binary":
        return (values >= BINARY_THRESHOLD).astype(np.int64)
    return values.astype(np.int64)


def resize_gray(img: np.ndarray, size: int) -> np.ndarray:
    # Area averaging when shrinking (no aliasing of speckle), bilinear when enlarging.
    interp = cv2.INTER_AREA if img.shape[0] > size or img.shape[1] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    # int64 is not a cv2 type; class ids fit in int32.
    return cv2.resize(mask.astype(np.int32), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int64)


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_csv(path: Path, columns: tuple[str, str]) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not all(c in header for c in columns):
                raise DataError(f"CSV {path}: the header must name the columns {list(columns)}, got {header}")
            rows = []
            for i, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if not row.get(columns[0]) and not row.get(columns[1]):
                    continue  # blank line
                if not row.get(columns[0]) or not row.get(columns[1]):
                    raise DataError(f"CSV {path} line {i}: empty '{columns[0]}' or '{columns[1]}'")
                rows.append((row[columns[0]], row[columns[1]]))
    except OSError as exc:
        raise DataError(f"cannot read CSV {path}: {exc.strerror}") from exc
    if not rows:
        raise DataError(f"CSV {path} has no rows")
    return rows


def resolve_csv_path(base: Path, rel: str, what: str, csv_path: Path) -> Path:
    p = Path(rel).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise DataError(f"CSV {csv_path}: {what} {rel!r} not found (looked at {p})")
    return p


def class_order(labels: list[str]) -> list[str]:
    names = sorted(set(labels))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return names


# --------------------------------------------------------------------------------------
# split file
# --------------------------------------------------------------------------------------
def write_split(path: Path, train: list[Sample], val: list[Sample]) -> None:
    """The split actually used, in split-file format (reusable as finetune.split_file)."""
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "split"])
    for name, part in (("train", train), ("val", val)):
        for s in part:
            w.writerow([s.key, name])
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------
class FinetuneDataset(Dataset):
    """Returns dict(image=(in_chans,S,S) float normalized, target=..., [mask_full=(H,W) int64])."""

    def __init__(self, samples: list[Sample], task: str, img_size: int, in_chans: int, norm_mean: float,
                 norm_std: float, train: bool, hflip_prob: float = 0.0, mask_mode: str = "ids",
                 num_classes: int = 0, target_mean: float = 0.0, target_std: float = 1.0, seed: int = 0,
                 augment: bool = False):
        self.samples, self.task, self.size, self.in_chans = samples, task, img_size, in_chans
        self.mean, self.std = norm_mean, norm_std
        self.train, self.hflip_prob, self.augment = train, hflip_prob, augment
        self.mask_mode, self.num_classes = mask_mode, num_classes
        self.target_mean, self.target_std = target_mean, target_std
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        img = resize_gray(read_gray(s.image), self.size).astype(np.float32) / 255.0
        # Seeded per (seed, epoch, sample): identical with any number of DataLoader workers.
        rng = random.Random(hash((self.seed, self.epoch, index)))
        flip = self.train and self.hflip_prob > 0 and rng.random() < self.hflip_prob
        if flip:
            img = img[:, ::-1]
        small = None
        if self.task == "segmentation":
            ids = mask_to_ids(read_mask(s.target), self.mask_mode)
            if ids.max(initial=0) >= self.num_classes:
                raise DataError(f"mask {s.target} holds class id {int(ids.max())} but there are "
                                f"{self.num_classes} classes (finetune.num_classes / mask_mode)")
            small = resize_mask(ids, self.size)
            if flip:
                small = small[:, ::-1]
        if self.train and self.augment:
            img, small = augment(np.ascontiguousarray(img), None if small is None else np.ascontiguousarray(small),
                                 rng)
        x = torch.from_numpy((np.ascontiguousarray(img) - self.mean) / self.std)[None]
        if self.in_chans > 1:
            x = x.expand(self.in_chans, -1, -1).clone()
        out = dict(image=x, index=index)
        if self.task == "classification":
            out["target"] = torch.tensor(int(s.target), dtype=torch.long)
        elif self.task == "regression":
            out["target"] = torch.tensor((float(s.target) - self.target_mean) / self.target_std, dtype=torch.float32)
        else:
            out["target"] = torch.from_numpy(np.ascontiguousarray(small))
            if not self.train:
                out["mask_full"] = torch.from_numpy(ids)  # metrics are taken at the mask's own resolution
        return out


def collate(batch: list[dict]) -> dict:
    # "*_full" entries (segmentation masks, ...) keep each image's own size: lists, not stacks
    out = {k: [b[k] for b in batch] if k.endswith("_full") else torch.stack([b[k] for b in batch])
           for k in batch[0] if k != "index"}
    out["index"] = [b["index"] for b in batch]
    return out
