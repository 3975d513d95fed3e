"""finetune.task=detection: boxes per image, a CenterNet-style anchor-free head.

Annotations (`finetune.csv`; paths relative to `finetune.data` when set, else to the file):
- CSV, header `path,x1,y1,x2,y2` (one class), optionally then `label` and / or `mask` (a mask
  file whose foreground inside the box is the instance), one row per box; a row whose box cells
  are empty lists an image without boxes (it still counts for false positives);
- COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h], optional `segmentation`,
  `categories`); file names are relative to `finetune.data` (or the JSON's folder).
Coordinates are pixel edges of the original image (0 .. width).

Why CenterNet (Zhou et al. 2019, "Objects as points") rather than FCOS: ultrasound findings are
few per image and rarely overlap, so one heatmap per class plus a size and a sub-pixel offset map
is enough; it needs no anchors, no FPN level assignment and no NMS (peaks are 3x3 local maxima),
and it is exactly a dense map at the input resolution, which the repository's multi-scale decoder
already produces. Output channels: C heatmaps, the mask channel when there are masks, then width,
height (input pixels) and the centre's x/y offset from its pixel. Training: penalty-reduced focal loss on Gaussian-splatted centres
(sigma = min(w, h) / 6, at least 1 px), L1 on log size (relative to a quarter of the input side)
and on the offset at the centre pixels.
Metrics: COCO box AP (IoU 0.50:0.95) and AP50 with pycocotools, in original pixels; 95% CIs by
bootstrap over validation images (at most 100 resamples: each is a full COCO evaluation).
With instance masks (all boxes have one, or none does): one more head channel, the mask of each
detected box, and COCO mask AP / AP50 (instance_masks.py says how and why); without, mask_ap is NaN.
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
from . import instance_masks as IM
from . import overlays
from .base import ImageDataset, TaskSpec, image_size, number, read_rows, resolve_image, sample_key

BOX_CHANNELS = 4            # w, h, offset x, offset y after the C heatmaps
SIZE_WEIGHT, OFFSET_WEIGHT, MASK_WEIGHT = 1.0, 1.0, 1.0
# Sizes are regressed as log(size / (SIZE_PRIOR * input side)): a head that starts near 0 then
# predicts boxes of a quarter of the image, not of one pixel, and the L1 treats a 2x error the
# same for small and large findings (pixel-space L1 left the size maps near 0 for many epochs).
SIZE_PRIOR = 0.25
HEATMAP_PRIOR = 0.1         # initial foreground probability of the heatmap logits (CenterNet)
AP_RESAMPLES = 100


@dataclass(frozen=True)
class BoxTarget:
    boxes: tuple[tuple[float, float, float, float, int], ...]   # x1 y1 x2 y2 class, original pixels
    width: int
    height: int
    masks: tuple[dict, ...] | None = None   # pycocotools RLE per box; None: no masks annotated


def _check_box(box, w: int, h: int, path: Path, where: str) -> None:
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) of {path} has x2 <= x1 or y2 <= y1")
    if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1:  # a pixel of slack for rounding
        raise DataError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) extends outside the image {path} ({w}x{h})")


def _read_csv(ann: Path) -> tuple[list[str], dict]:
    header, body = read_rows(ann)
    if header[:5] != ["path", "x1", "y1", "x2", "y2"] or header[5:] not in ([], ["label"], ["mask"], ["label", "mask"]):
        raise DataError(f"box CSV {ann}: the header must be path,x1,y1,x2,y2[,label][,mask], got {','.join(header)}")
    col = {name: i for i, name in enumerate(header)}
    per_image: dict[str, list] = {}
    for line, cells in body:
        where = f"box CSV {ann} line {line}"
        boxes = per_image.setdefault(cells[0], [])
        if not any(cells[1:5]):
            continue
        box = tuple(number(c, k, where) for c, k in zip(cells[1:5], ("x1", "y1", "x2", "y2")))
        mask = None
        if "mask" in col:
            if not cells[col["mask"]]:
                raise DataError(f"{where}: the mask cell is empty (with a mask column every box needs its mask)")
            mask = ("file", cells[col["mask"]])
        boxes.append((box, cells[col["label"]] if "label" in col else "object", where, mask))
    names = class_order([b[1] for boxes in per_image.values() for b in boxes] or ["object"])
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
        seg = ("coco", a["segmentation"]) if a.get("segmentation") not in (None, [], {}) else None
        per_image[images[a["image_id"]]].append(((x, y, x + w, y + h), label, where, seg))
    names = sorted({b[1] for boxes in per_image.values() for b in boxes}) or ["object"]
    return names, per_image


def _instance_masks(boxes: list, path: Path, base: Path, w: int, h: int) -> tuple[dict, ...]:
    """RLE per box from its COCO segmentation or its mask file (each file read once per image)."""
    files: dict[str, np.ndarray] = {}
    out = []
    for box, _, where, (kind, source) in boxes:
        if kind == "coco":
            rle = IM.from_coco(source, w, h, where)
        else:
            if source not in files:
                files[source] = IM.foreground_of_file(resolve_image(base, source, where), w, h)
            rle = IM.encode(IM.crop_to_box(files[source], box))
        if IM.area(rle) == 0:
            raise DataError(f"{where}: the mask of box ({', '.join(f'{v:g}' for v in box)}) in {path} is empty "
                            f"inside the box")
        out.append(rle)
    return tuple(out)


def read_boxes(ann: Path, base: Path) -> tuple[list[str], list[tuple[Path, BoxTarget]]]:
    names, per_image = _read_coco(ann) if ann.suffix.lower() == ".json" else _read_csv(ann)
    index = {n: i for i, n in enumerate(names)}
    entries = [b for boxes in per_image.values() for b in boxes]
    with_mask = [b for b in entries if b[3] is not None]
    if with_mask and len(with_mask) < len(entries):
        lacking = next(b for b in entries if b[3] is None)
        raise DataError(f"{lacking[2]}: this box has no mask while {len(with_mask)} others have one; mask AP "
                        f"needs every instance's mask (or none)")
    out = []
    for rel, boxes in per_image.items():
        where = boxes[0][2] if boxes else f"annotations {ann}"
        path = resolve_image(base, rel, where)
        w, h = image_size(path)
        for box, _, where, _ in boxes:
            _check_box(box, w, h, path, where)
        masks = _instance_masks(boxes, path, base, w, h) if with_mask else None
        out.append((path, BoxTarget(tuple((*b[0], index[b[1]]) for b in boxes), w, h, masks)))
    return names, out


def has_masks(samples) -> bool:
    return bool(samples) and all(s.target.masks is not None for s in samples)


def encode_targets(boxes: np.ndarray, num_classes: int, size: int, mask: np.ndarray | None = None) -> torch.Tensor:
    """(C + 6, S, S): heatmaps, w, h, offset x, offset y, centre indicator, instance foreground
    (IM.NO_MASK where it is not trained); boxes in input pixels."""
    t = np.zeros((num_classes + BOX_CHANNELS + 2, size, size), np.float32)
    t[-1] = IM.NO_MASK if mask is None else IM.inside_boxes(mask, boxes)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    for x1, y1, x2, y2, c in boxes:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        sigma = max(1.0, min(w, h) / 6)
        g = np.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma ** 2))
        ix, iy = min(int(cx), size - 1), min(int(cy), size - 1)
        t[int(c)] = np.maximum(t[int(c)], g)
        t[int(c), iy, ix] = 1.0
        prior = SIZE_PRIOR * size
        t[num_classes:num_classes + 5, iy, ix] = (math.log(w / prior), math.log(h / prior), cx - ix, cy - iy, 1.0)
    return torch.from_numpy(t)


def decode_boxes(out: torch.Tensor, num_classes: int, k: int) -> list[np.ndarray]:
    """(B, C [+ 1 mask] + 4, S, S) -> per image (M, 6) x1 y1 x2 y2 class score at input resolution.
    The box maps are the last four channels, the mask channel sits between."""
    heat = out[:, :num_classes].float().sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, _, s, _ = heat.shape
    scores, idx = peaks.flatten(1).topk(min(k, peaks[0].numel()), dim=1)
    result = []
    for i in range(b):
        cls, rest = idx[i] // (s * s), idx[i] % (s * s)
        iy, ix = rest // s, rest % s
        w, h, ox, oy = (out[i, j - BOX_CHANNELS].float()[iy, ix] for j in range(BOX_CHANNELS))
        cx, cy = ix.float() + ox, iy.float() + oy
        w, h = (SIZE_PRIOR * s * v.clamp(-8.0, 3.0).exp() for v in (w, h))
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cls.float(), scores[i]], dim=1)
        keep = scores[i] > 0
        result.append(boxes[keep].cpu().numpy().astype(np.float64))
    return result


def coco_ap(truths: list[np.ndarray], preds: list[np.ndarray], sizes: list[tuple[int, int]],
            num_classes: int, truth_masks: list | None = None, pred_masks: list | None = None) -> tuple[float, float]:
    """(AP@[.50:.95], AP50) with pycocotools; NaN without any ground-truth box. With masks (RLE per
    box, lists parallel to truths / preds) the IoU is the masks' (iouType "segm"), else the boxes'."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if sum(len(t) for t in truths) == 0:
        return math.nan, math.nan
    segm = truth_masks is not None
    images, anns, dets = [], [], []
    for i, (t, p, (w, h)) in enumerate(zip(truths, preds, sizes)):
        images.append(dict(id=i, width=w, height=h))
        for j, b in enumerate(t):
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(b[4]), iscrowd=0,
                             bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1])))
            if segm:
                anns[-1].update(segmentation=truth_masks[i][j], area=IM.area(truth_masks[i][j]))
        for j, b in enumerate(p):
            dets.append(dict(image_id=i, category_id=int(b[4]), score=float(b[5])))
            if segm:
                dets[-1]["segmentation"] = pred_masks[i][j]
            else:
                dets[-1]["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = dict(images=images, annotations=anns, categories=[dict(id=c) for c in range(num_classes)])
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "segm" if segm else "bbox")
        ev.params.maxDets = [1, 10, max(100, max(len(p) for p in preds))]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return (math.nan if ap < 0 else ap), (math.nan if ap50 < 0 else ap50)


def detection_summary(truths, preds, sizes, num_classes: int, truth_masks=None, pred_masks=None) -> dict:
    ap, ap50 = coco_ap(list(truths), list(preds), list(sizes), num_classes)
    mask_ap = mask_ap50 = math.nan
    if truth_masks is not None:
        mask_ap, mask_ap50 = coco_ap(list(truths), list(preds), list(sizes), num_classes,
                                     list(truth_masks), list(pred_masks))
    return dict(box_ap=ap, box_ap50=ap50, mask_ap=mask_ap, mask_ap50=mask_ap50)


class DetectionDataset(ImageDataset):
    def __init__(self, samples, train: bool, num_classes: int, **common):
        super().__init__(samples, train, **common)
        self.with_masks = has_masks(samples)
        self.box_classes = num_classes - BOX_CHANNELS - self.with_masks

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        t: BoxTarget = s.target
        img = self.load(s.image)
        mask = IM.union_target(t.masks, t.width, t.height, self.size) if self.with_masks else None
        boxes = np.asarray(t.boxes, np.float64).reshape(-1, 5)
        boxes[:, [0, 2]] *= self.size / t.width
        boxes[:, [1, 3]] *= self.size / t.height
        if self.train and self.hflip_prob > 0 and self.rng(index).random() < self.hflip_prob:
            img = img[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
            boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
        return dict(image=self.to_input(img), index=index,
                    target=encode_targets(boxes, self.box_classes, self.size, mask))


class DetectionTask(TaskSpec):
    name = "detection"
    metrics = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")
    monitor = "box_ap"
    baseline_name = "mean box"

    def discover(self, ft, root: Path, csv_path: Path | None) -> TaskData:
        if csv_path is None:
            raise DataError("finetune.task=detection needs finetune.csv (a CSV path,x1,y1,x2,y2[,label] or COCO JSON)")
        names, rows = read_boxes(csv_path, root)
        samples = [Sample(path, target, sample_key(path, root)) for path, target in rows]
        return TaskData(samples, None, root, target_names=names)

    def num_outputs(self, task: TaskData, ft) -> int:
        return len(task.target_names) + has_masks(task.samples) + BOX_CHANNELS

    def dataset(self, samples, train: bool, ft, common: dict) -> DetectionDataset:
        return DetectionDataset(samples, train, **common)

    def init_head(self, model, export_weights: Path, init: str, task: TaskData) -> None:
        """Heatmaps start at the CenterNet prior; the mask channel keeps p ~ 0.5, so that early masks
        are about the whole box rather than empty (with the prior, p < 0.5 everywhere for epochs)."""
        conv = model.decoder.predict
        per_channel = model.decoder.unfold.upscale_factor ** 2
        classes = len(task.target_names)
        with torch.no_grad():  # PixelShuffle: output channel c comes from conv channels c*p*p .. (c+1)*p*p-1
            conv.bias[:classes * per_channel] = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)

    def loss(self, out: torch.Tensor, target: torch.Tensor, ft) -> torch.Tensor:
        c = target.shape[1] - BOX_CHANNELS - 2
        heat_t, centre = target[:, :c], target[:, c + 4]
        extra = IM.mask_loss(out[:, c], target[:, -1]) if out.shape[1] == c + 1 + BOX_CHANNELS else 0.0
        p = out[:, :c].sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = heat_t.eq(1).float()
        focal = -(pos * (1 - p) ** 2 * p.log() + (1 - pos) * (1 - heat_t) ** 4 * p ** 2 * (1 - p).log()).sum()
        n = centre.sum().clamp_min(1.0)
        reg = (out[:, -BOX_CHANNELS:] - target[:, c:c + 4]).abs() * centre[:, None]
        return (focal + SIZE_WEIGHT * reg[:, :2].sum() + OFFSET_WEIGHT * reg[:, 2:].sum()) / n + MASK_WEIGHT * extra

    def _original(self, runner, index: int, boxes: np.ndarray) -> np.ndarray:
        t: BoxTarget = runner.val_set.samples[index].target
        boxes = boxes.copy()
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * t.width / runner.img_size, 0, t.width)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * t.height / runner.img_size, 0, t.height)
        return boxes

    def evaluate(self, runner, model, keep: int) -> tuple[dict, dict]:
        losses, n, truths, preds, sizes, truth_masks, pred_masks = 0.0, 0, [], [], [], [], []
        with_masks = runner.val_set.with_masks
        c = runner.num_outputs - BOX_CHANNELS - with_masks
        for batch in runner.val_loader:
            x = batch["image"].to(runner.device)
            with runner._autocast():
                out = model(x)
            out = out.float()
            losses += self.loss(out, batch["target"].to(runner.device), runner.ft).item() * len(x)
            n += len(x)
            for i, (boxes, index) in enumerate(zip(decode_boxes(out, c, runner.ft.max_detections), batch["index"])):
                t: BoxTarget = runner.val_set.samples[index].target
                preds.append(self._original(runner, index, boxes))
                truths.append(np.asarray(t.boxes, np.float64).reshape(-1, 5))
                sizes.append((t.width, t.height))
                if with_masks:
                    truth_masks.append(t.masks)
                    pred_masks.append(IM.predicted_masks(out[i, c], preds[-1], t.width, t.height))
        masks = dict(truth_masks=truth_masks, pred_masks=pred_masks) if with_masks else {}
        details = dict(truths=truths, preds=preds, sizes=sizes, num_classes=c, **masks)
        return dict(loss=losses / max(n, 1), **detection_summary(truths, preds, sizes, c, **masks)), details

    def final(self, details: dict, resamples: int, seed: int) -> dict:
        t, p, s, c = details["truths"], details["preds"], details["sizes"], details["num_classes"]
        tm, pm = details.get("truth_masks"), details.get("pred_masks")
        out = detection_summary(t, p, s, c, tm, pm)
        rows, cache = np.arange(len(t)), {}

        def resampled(idx) -> dict:
            # Every metric's bootstrap draws the same resamples (same seed): one COCO run each.
            key = idx.tobytes()
            if key not in cache:
                cache[key] = detection_summary([t[i] for i in idx], [p[i] for i in idx], [s[i] for i in idx], c,
                                               None if tm is None else [tm[i] for i in idx],
                                               None if pm is None else [pm[i] for i in idx])
            return cache[key]
        for name in self.metrics:
            out[f"{name}_ci"] = list(bootstrap_ci(lambda idx, name=name: resampled(idx)[name], [rows],
                                                  min(resamples, AP_RESAMPLES), seed))
        return out

    def figures(self, runner, details: dict) -> list[Path]:
        items, masks = [], [] if "pred_masks" in details else None
        for n, (sample, truth, pred) in enumerate(list(zip(runner.val_set.samples, details["truths"],
                                                              details["preds"]))[:8]):
            confident = pred[:, 5] >= 0.3 if len(pred) else np.zeros(0, bool)  # shown; AP uses all
            items.append((read_gray(sample.image), truth, pred[confident],
                          f"{Path(sample.key).name} {int(confident.sum())} box(es)"))
            if masks is not None:
                masks.append(([IM.decode(r) for r in details["truth_masks"][n]],
                              [IM.decode(r) for r, c in zip(details["pred_masks"][n], confident) if c]))
        return [overlays.boxes_png(items, runner.task_data.target_names, runner.run_dir / "overlays.png",
                                   masks=masks)]

    def baseline(self, train, val, runner) -> dict:
        """One box per class present in training, at its mean relative position and size (with
        masks: the filled box is its mask)."""
        with_masks = has_masks(val)
        c = runner.num_outputs - BOX_CHANNELS - with_masks
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
        if not with_masks:
            return dict(truths=truths, preds=preds, sizes=sizes, num_classes=c)
        return dict(truths=truths, preds=preds, sizes=sizes, num_classes=c, truth_masks=[s.target.masks for s in val],
                    pred_masks=[IM.filled_boxes(p, w, h) for p, (w, h) in zip(preds, sizes)])
