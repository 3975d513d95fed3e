"""finetune.task=detection: boxes per image, a CenterNet-style anchor-free head.

Annotations (`finetune.csv`; paths relative to `finetune.data` when set, else to the file):
- CSV, header `path,x1,y1,x2,y2` (one class) or `path,x1,y1,x2,y2,label`, one row per box; a row
  whose box cells are empty lists an image without boxes (it still counts for false positives);
- COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`); file names are
  relative to `finetune.data` (or the JSON's folder).
Coordinates are pixel edges of the original image (0 .. width).

Why CenterNet (Zhou et al. 2019, "Objects as points") rather than FCOS: ultrasound findings are
few per image and rarely overlap, so one heatmap per class plus a size and a sub-pixel offset map
is enough; it needs no anchors, no FPN level assignment and no NMS (peaks are 3x3 local maxima),
and it is exactly a dense map at the input resolution, which the repository's multi-scale decoder
already produces. Output channels: C heatmaps, then width, height (input pixels) and the centre's
x/y offset from its pixel. Training: penalty-reduced focal loss on Gaussian-splatted centres
(sigma = min(w, h) / 6, at least 1 px), L1 on size (weight 0.1) and offset at the centre pixels.
Metrics: COCO box AP (IoU 0.50:0.95) and AP50 with pycocotools, in original pixels; 95% CIs by
bootstrap over validation images (at most 100 resamples: each is a full COCO evaluation).
Mask AP is not computed: this head predicts no instance masks.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataError, Sample, TaskData, class_order, read_gray
from ..metrics import bootstrap_ci
from . import overlays
from .base import ImageDataset, TaskSpec, image_size, number, read_rows, resolve_image, sample_key

BOX_CHANNELS = 4            # w, h, offset x, offset y after the C heatmaps
SIZE_WEIGHT, OFFSET_WEIGHT = 0.1, 1.0
HEATMAP_PRIOR = 0.1         # initial foreground probability of the heatmap logits (CenterNet)
AP_RESAMPLES = 100


@dataclass(frozen=True)
class BoxTarget:
    boxes: tuple[tuple[float, float, float, float, int], ...]   # x1 y1 x2 y2 class, original pixels
    width: int
    height: int


def _check_box(box, w: int, h: int, path: Path, where: str) -> None:
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) of {path} has x2 <= x1 or y2 <= y1")
    if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1:  # a pixel of slack for rounding
        raise DataError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) extends outside the image {path} ({w}x{h})")


def _read_csv(ann: Path) -> tuple[list[str], dict]:
    header, body = read_rows(ann)
    if header[:5] != ["path", "x1", "y1", "x2", "y2"] or len(header) not in (5, 6) or \
            (len(header) == 6 and header[5] != "label"):
        raise DataError(f"box CSV {ann}: the header must be path,x1,y1,x2,y2[,label], got {','.join(header)}")
    per_image: dict[str, list] = {}
    for line, cells in body:
        where = f"box CSV {ann} line {line}"
        boxes = per_image.setdefault(cells[0], [])
        if not any(cells[1:5]):
            continue
        box = tuple(number(c, k, where) for c, k in zip(cells[1:5], ("x1", "y1", "x2", "y2")))
        boxes.append((box, cells[5] if len(cells) == 6 else "object", where))
    names = class_order([label for boxes in per_image.values() for _, label, _ in boxes] or ["object"])
    return names, per_image


def _read_coco(ann: Path) -> tuple[list[str], dict]:
    try:
        doc = json.loads(ann.read_text(encoding="utf-8"))
        images = {im["id"]: im["file_name"] for im in doc["images"]}
        cats = {c["id"]: str(c["name"]) for c in doc.get("categories", [])}
        annotations = doc.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read COCO JSON {ann}: {type(exc).__name__}: {exc}") from exc
    per_image: dict[str, list] = {name: [] for name in images.values()}
    for i, a in enumerate(annotations):
        where = f"COCO JSON {ann} annotations[{i}]"
        if a.get("image_id") not in images:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DataError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (number(str(v), k, where) for v, k in zip(bbox, ("x", "y", "width", "height")))
        label = cats.get(a.get("category_id"), str(a.get("category_id")))
        per_image[images[a["image_id"]]].append(((x, y, x + w, y + h), label, where))
    names = sorted({label for boxes in per_image.values() for _, label, _ in boxes}) or ["object"]
    return names, per_image


def read_boxes(ann: Path, base: Path) -> tuple[list[str], list[tuple[Path, BoxTarget]]]:
    names, per_image = _read_coco(ann) if ann.suffix.lower() == ".json" else _read_csv(ann)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for rel, boxes in per_image.items():
        where = boxes[0][2] if boxes else f"annotations {ann}"
        path = resolve_image(base, rel, where)
        w, h = image_size(path)
        for box, _, where in boxes:
            _check_box(box, w, h, path, where)
        out.append((path, BoxTarget(tuple((*box, index[label]) for box, label, _ in boxes), w, h)))
    return names, out


def encode_targets(boxes: np.ndarray, num_classes: int, size: int) -> torch.Tensor:
    """(C + 5, S, S): heatmaps, w, h, offset x, offset y, centre indicator; boxes in input pixels."""
    t = np.zeros((num_classes + BOX_CHANNELS + 1, size, size), np.float32)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    for x1, y1, x2, y2, c in boxes:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        sigma = max(1.0, min(w, h) / 6)
        g = np.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma ** 2))
        ix, iy = min(int(cx), size - 1), min(int(cy), size - 1)
        t[int(c)] = np.maximum(t[int(c)], g)
        t[int(c), iy, ix] = 1.0
        t[num_classes:num_classes + 5, iy, ix] = (w, h, cx - ix, cy - iy, 1.0)
    return torch.from_numpy(t)


def decode_boxes(out: torch.Tensor, num_classes: int, k: int) -> list[np.ndarray]:
    """(B, C + 4, S, S) -> per image (M, 6) x1 y1 x2 y2 class score at input resolution."""
    heat = out[:, :num_classes].float().sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, _, s, _ = heat.shape
    scores, idx = peaks.flatten(1).topk(min(k, peaks[0].numel()), dim=1)
    result = []
    for i in range(b):
        cls, rest = idx[i] // (s * s), idx[i] % (s * s)
        iy, ix = rest // s, rest % s
        w, h, ox, oy = (out[i, num_classes + j].float()[iy, ix] for j in range(BOX_CHANNELS))
        cx, cy = ix.float() + ox, iy.float() + oy
        w, h = w.clamp_min(1.0), h.clamp_min(1.0)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cls.float(), scores[i]], dim=1)
        keep = scores[i] > 0
        result.append(boxes[keep].cpu().numpy().astype(np.float64))
    return result


def coco_ap(truths: list[np.ndarray], preds: list[np.ndarray], sizes: list[tuple[int, int]],
            num_classes: int) -> tuple[float, float]:
    """(AP@[.50:.95], AP50) with pycocotools; NaN without any ground-truth box."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if sum(len(t) for t in truths) == 0:
        return math.nan, math.nan
    images, anns, dets = [], [], []
    for i, (t, p, (w, h)) in enumerate(zip(truths, preds, sizes)):
        images.append(dict(id=i, width=w, height=h))
        for b in t:
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(b[4]), iscrowd=0,
                             bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
        for b in p:
            dets.append(dict(image_id=i, category_id=int(b[4]), score=float(b[5]),
                             bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]]))
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=c) for c in range(num_classes)])
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, max(100, max(len(p) for p in preds))]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return (math.nan if ap < 0 else ap), (math.nan if ap50 < 0 else ap50)


def detection_summary(truths, preds, sizes, num_classes: int) -> dict:
    ap, ap50 = coco_ap(list(truths), list(preds), list(sizes), num_classes)
    return dict(box_ap=ap, box_ap50=ap50)


class DetectionDataset(ImageDataset):
    def __init__(self, samples, train: bool, num_classes: int, **common):
        super().__init__(samples, train, **common)
        self.box_classes = num_classes - BOX_CHANNELS

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        t: BoxTarget = s.target
        img = self.load(s.image)
        boxes = np.asarray(t.boxes, np.float64).reshape(-1, 5)
        boxes[:, [0, 2]] *= self.size / t.width
        boxes[:, [1, 3]] *= self.size / t.height
        if self.train and self.hflip_prob > 0 and self.rng(index).random() < self.hflip_prob:
            img = img[:, ::-1]
            boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
        return dict(image=self.to_input(img), index=index, target=encode_targets(boxes, self.box_classes, self.size))


class DetectionTask(TaskSpec):
    name = "detection"
    metrics = ("box_ap", "box_ap50")
    monitor = "box_ap"
    baseline_name = "mean box"

    def discover(self, ft, root: Path, csv_path: Path | None) -> TaskData:
        if csv_path is None:
            raise DataError("finetune.task=detection needs finetune.csv (a CSV path,x1,y1,x2,y2[,label] or COCO JSON)")
        names, rows = read_boxes(csv_path, root)
        samples = [Sample(path, target, sample_key(path, root)) for path, target in rows]
        return TaskData(samples, None, root, target_names=names)

    def num_outputs(self, task: TaskData, ft) -> int:
        return len(task.target_names) + BOX_CHANNELS

    def dataset(self, samples, train: bool, ft, common: dict) -> DetectionDataset:
        return DetectionDataset(samples, train, **common)

    def init_head(self, model, export_weights: Path, init: str) -> None:
        conv = model.decoder.predict
        per_channel = model.decoder.unfold.upscale_factor ** 2
        classes = conv.out_channels // per_channel - BOX_CHANNELS
        with torch.no_grad():  # PixelShuffle: output channel c comes from conv channels c*p*p .. (c+1)*p*p-1
            conv.bias[:classes * per_channel] = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)

    def loss(self, out: torch.Tensor, target: torch.Tensor, ft) -> torch.Tensor:
        c = out.shape[1] - BOX_CHANNELS
        heat_t, centre = target[:, :c], target[:, c + 4]
        p = out[:, :c].sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = heat_t.eq(1).float()
        focal = -(pos * (1 - p) ** 2 * p.log() + (1 - pos) * (1 - heat_t) ** 4 * p ** 2 * (1 - p).log()).sum()
        n = centre.sum().clamp_min(1.0)
        reg = (out[:, c:c + 4] - target[:, c:c + 4]).abs() * centre[:, None]
        return (focal + SIZE_WEIGHT * reg[:, :2].sum() + OFFSET_WEIGHT * reg[:, 2:].sum()) / n

    def _original(self, runner, index: int, boxes: np.ndarray) -> np.ndarray:
        t: BoxTarget = runner.val_set.samples[index].target
        boxes = boxes.copy()
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * t.width / runner.img_size, 0, t.width)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * t.height / runner.img_size, 0, t.height)
        return boxes

    def evaluate(self, runner, model, keep: int) -> tuple[dict, dict]:
        losses, n, truths, preds, sizes = 0.0, 0, [], [], []
        c = runner.num_outputs - BOX_CHANNELS
        for batch in runner.val_loader:
            x = batch["image"].to(runner.device)
            with runner._autocast():
                out = model(x)
            out = out.float()
            losses += self.loss(out, batch["target"].to(runner.device), runner.ft).item() * len(x)
            n += len(x)
            for boxes, index in zip(decode_boxes(out, c, runner.ft.max_detections), batch["index"]):
                t: BoxTarget = runner.val_set.samples[index].target
                preds.append(self._original(runner, index, boxes))
                truths.append(np.asarray(t.boxes, np.float64).reshape(-1, 5))
                sizes.append((t.width, t.height))
        details = dict(truths=truths, preds=preds, sizes=sizes, num_classes=c)
        return dict(loss=losses / max(n, 1), **detection_summary(truths, preds, sizes, c)), details

    def final(self, details: dict, resamples: int, seed: int) -> dict:
        t, p, s, c = details["truths"], details["preds"], details["sizes"], details["num_classes"]
        out = detection_summary(t, p, s, c)
        rows = np.arange(len(t))
        for name in self.metrics:
            def fn(idx, name=name):
                return detection_summary([t[i] for i in idx], [p[i] for i in idx], [s[i] for i in idx], c)[name]
            out[f"{name}_ci"] = list(bootstrap_ci(fn, [rows], min(resamples, AP_RESAMPLES), seed))
        return out

    def figures(self, runner, details: dict) -> list[Path]:
        items = []
        for sample, truth, pred in list(zip(runner.val_set.samples, details["truths"], details["preds"]))[:8]:
            shown = pred[pred[:, 5] >= 0.3] if len(pred) else pred  # confident boxes only, AP uses all
            items.append((read_gray(sample.image), truth, shown, f"{Path(sample.key).name} {len(shown)} box(es)"))
        return [overlays.boxes_png(items, runner.task_data.target_names, runner.run_dir / "overlays.png")]

    def baseline(self, train, val, runner) -> dict:
        """One box per class present in training, at its mean relative position and size."""
        c = runner.num_outputs - BOX_CHANNELS
        rel = [[] for _ in range(c)]
        for s in train:
            for x1, y1, x2, y2, k in s.target.boxes:
                w, h = s.target.width, s.target.height
                rel[int(k)].append((x1 / w, y1 / h, x2 / w, y2 / h))
        means = [(k, np.mean(r, axis=0)) for k, r in enumerate(rel) if r]
        truths, preds, sizes = [], [], []
        for s in val:
            w, h = s.target.width, s.target.height
            preds.append(np.array([[m[0] * w, m[1] * h, m[2] * w, m[3] * h, k, 1.0] for k, m in means]).reshape(-1, 6))
            truths.append(np.asarray(s.target.boxes, np.float64).reshape(-1, 5))
            sizes.append((w, h))
        return dict(truths=truths, preds=preds, sizes=sizes, num_classes=c)
