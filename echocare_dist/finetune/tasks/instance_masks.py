"""Instance masks of the detection task: reading them, the head's training target, the mask of
each predicted box, and COCO mask AP.

Sources (detection.py hands over what it read):
- COCO JSON `segmentation`: polygons `[[x, y, ...], ...]` or RLE (`counts` compressed string or
  uncompressed list, `size` [height, width]);
- a `mask` column in the box CSV naming a mask file (any file the segmentation task reads; values
  follow data.py's mask rules, foreground = class id > 0); a box's instance is the mask's
  foreground inside the box (several boxes may name one file: one mask per image, as in BUSI).
Masks live as pycocotools RLEs in original pixels: compact, and what COCOeval takes directly.

Prediction ("a light mask branch"): one more output channel of the dense head, a class-agnostic
foreground logit map, trained with BCE + soft Dice on the union of the instances inside the
(grown) true boxes. The mask of a detected box is that map at original resolution, thresholded at p = 0.5 and cropped to the box.
Why not a per-box mask head (Mask R-CNN's RoIAlign + small FCN): findings rarely overlap (the
reason the box head is CenterNet), so the box already separates instances and one extra channel
of the decoder that exists anyway costs nothing; an overlap of two findings would merge inside the
intersection of their boxes, which a per-box head would resolve.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataError, mask_to_ids, read_mask, resolve_mask_mode

MASK_THRESHOLD = 0.5
NO_MASK = -1.0      # target value where the mask is not trained (the loss ignores it)
BOX_MARGIN = 0.25


def encode(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils
    return mask_utils.decode(rle).astype(bool)


def area(rle: dict) -> float:
    from pycocotools import mask as mask_utils
    return float(mask_utils.area(rle))


def box_region(shape: tuple[int, int], box) -> tuple[slice, slice]:
    """Rows and columns of the pixels whose centres lie in a box given in pixel edges."""
    h, w = shape
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    cols = slice(max(int(np.ceil(x1 - 0.5)), 0), min(int(np.ceil(x2 - 0.5)), w))
    rows = slice(max(int(np.ceil(y1 - 0.5)), 0), min(int(np.ceil(y2 - 0.5)), h))
    return rows, cols


def crop_to_box(foreground: np.ndarray, box) -> np.ndarray:
    out = np.zeros(foreground.shape, bool)
    rows, cols = box_region(foreground.shape, box)
    out[rows, cols] = foreground[rows, cols]
    return out


def from_coco(segmentation, width: int, height: int, where: str) -> dict:
    """RLE of a COCO `segmentation` (polygons or RLE) of an image of width x height."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or ()) != [height, width]:
            raise DataError(f"{where}: segmentation size {size!r} is not the image's [height, width] "
                            f"[{height}, {width}]")
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, (str, bytes)):
            return dict(size=[height, width], counts=counts.encode() if isinstance(counts, str) else counts)
        raise DataError(f"{where}: segmentation 'counts' must be an RLE string or list, got {type(counts).__name__}")
    if not isinstance(segmentation, list) or not segmentation:
        raise DataError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {segmentation!r:.80}")
    polygons = []
    for k, poly in enumerate(segmentation):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or \
                not all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly):
            raise DataError(f"{where}: segmentation polygon {k} must be [x1, y1, x2, y2, ...] with at least "
                            f"3 points, got {poly!r:.80}")
        polygons.append([float(v) for v in poly])
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def foreground_of_file(path, width: int, height: int) -> np.ndarray:
    """Foreground (class id > 0) of a mask file at the image's size (nearest neighbour)."""
    values = read_mask(path)
    try:
        ids = mask_to_ids(values, resolve_mask_mode(set(np.unique(values).tolist()), "auto"))
    except DataError as exc:
        raise DataError(f"mask {path}: {exc}") from None
    fg = (ids > 0).astype(np.uint8)
    if fg.shape != (height, width):
        fg = cv2.resize(fg, (width, height), interpolation=cv2.INTER_NEAREST)
    return fg.astype(bool)


def union_target(rles, width: int, height: int, size: int) -> np.ndarray:
    """(S, S) float32 0/1: every instance of an image, resized to the input size."""
    union = np.zeros((height, width), np.uint8)
    for rle in rles:
        union |= decode(rle).astype(np.uint8)
    return cv2.resize(union, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.float32)


def inside_boxes(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The mask where it is trained: inside the true boxes grown by BOX_MARGIN of their size on
    each side, NO_MASK elsewhere. As Mask R-CNN trains its mask head on positive boxes only: the
    predicted masks are only ever read inside boxes, and over the whole image the 1-2% foreground
    of a typical scan teaches the map to say "background" everywhere first."""
    out = np.full(mask.shape, NO_MASK, np.float32)
    for x1, y1, x2, y2, *_ in boxes:
        mx, my = BOX_MARGIN * (x2 - x1), BOX_MARGIN * (y2 - y1)
        rows, cols = box_region(mask.shape, (x1 - mx, y1 - my, x2 + mx, y2 + my))
        out[rows, cols] = mask[rows, cols]
    return out


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of (B, S, S) foreground logits; pixels marked NO_MASK do not count."""
    valid = target >= 0
    if not valid.any():
        return logits.sum() * 0.0
    t = target.clamp_min(0.0)
    bce = F.binary_cross_entropy_with_logits(logits[valid], t[valid])
    p = logits.sigmoid() * valid
    dice = 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + (t * valid).sum() + 1.0)
    return bce + dice


def predicted_masks(foreground_logits: torch.Tensor, boxes: np.ndarray, width: int, height: int) -> list[dict]:
    """RLE per box (original pixels) from the (S, S) foreground logits of one image."""
    up = F.interpolate(foreground_logits[None, None].float(), size=(height, width), mode="bilinear",
                       align_corners=False)[0, 0]
    fg = (up.sigmoid() > MASK_THRESHOLD).cpu().numpy()
    return [encode(crop_to_box(fg, b)) for b in boxes]


def filled_boxes(boxes: np.ndarray, width: int, height: int) -> list[dict]:
    """The boxes themselves as masks (the reference predictor's masks)."""
    return [encode(crop_to_box(np.ones((height, width), bool), b)) for b in boxes]
