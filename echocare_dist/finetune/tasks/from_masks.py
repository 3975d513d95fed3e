"""Box and landmark annotations derived from a segmentation dataset's masks, so that a public
segmentation set (BUSI) also gives a real detection and a real landmark task:

  python -m echocare_dist.finetune.tasks.from_masks DATA OUT [--mask-mode binary]

`--mask-mode binary` for masks with stray values (BUSI has a few 1s among 0/255).
DATA is any layout the segmentation task reads (pairing.py: images/ + masks/, or masks beside
their images as in BUSI; several masks of one image are merged). Writes OUT/boxes.csv (one box per
lesion = 8-connected mask component of at least 12 pixels, pixel edges; images whose masks are
empty appear with empty cells), OUT/instances.json (the same boxes as COCO with each component's
RLE `segmentation`: detection with instance masks and mask AP) and OUT/landmarks.csv (the top, bottom, left and right extreme
points of the largest lesion, pixel centres; images without a lesion are left out), paths relative
to DATA. These are lesion extents, not clinical landmarks: the honest name for the landmark task
built from them is "lesion extreme points" (as in the extreme-point annotation of Papadopoulos et
al. 2017). The rule is the one `echocare synth --tasks` uses (synth/tasks.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ...atomic import atomic_write_json, atomic_write_text
from ...config_sections import FinetuneConfig
from ...synth.tasks import POINTS, extreme_points, lesion_components
from ..data import DataError, mask_to_ids, read_mask, resolve_mask_mode, scan_mask_values
from ..pairing import discover_segmentation_folders
from . import instance_masks as IM

log = logging.getLogger(__name__)


def _csv(header: list[str], rows: list[list[str]]) -> str:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def derive_annotations(data: Path, out: Path, mask_mode: str = "auto") -> dict[str, int]:
    ft = FinetuneConfig(data=str(data), task="segmentation")  # default pairing rules (mask suffix _mask)
    samples, _ = discover_segmentation_folders(data, ft)
    if not samples:
        raise DataError(f"{data}: no image/mask pairs found")
    mode = resolve_mask_mode(scan_mask_values([s.target for s in samples]), mask_mode)  # data.py's rules
    box_rows, point_rows = [], []
    coco = dict(images=[], annotations=[], categories=[dict(id=1, name="lesion")])
    for s in samples:
        with Image.open(s.image) as im:
            w, h = im.size
        ids = mask_to_ids(read_mask(s.target), mode)
        fg = cv2.resize((ids > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        components = lesion_components(fg)
        rel = s.key
        image_id = len(coco["images"]) + 1
        coco["images"].append(dict(id=image_id, file_name=rel, width=w, height=h))
        for comp in components:
            ys, xs = np.nonzero(comp)
            rle = IM.encode(comp)
            coco["annotations"].append(dict(
                id=len(coco["annotations"]) + 1, image_id=image_id, category_id=1, iscrowd=0,
                bbox=[int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                area=int(comp.sum()), segmentation=dict(size=[h, w], counts=rle["counts"].decode("ascii"))))
        if not components:
            box_rows.append([rel, "", "", "", "", ""])
            continue
        for comp in components:
            ys, xs = np.nonzero(comp)
            box_rows.append([rel, str(xs.min()), str(ys.min()), str(xs.max() + 1), str(ys.max() + 1), "lesion"])
        point_rows.append([rel, *(f"{v:.2f}" for p in extreme_points(components[0]) for v in p)])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "boxes.csv", _csv(["path", "x1", "y1", "x2", "y2", "label"], box_rows))
    atomic_write_json(out / "instances.json", coco)
    atomic_write_text(out / "landmarks.csv",
                      _csv(["path"] + [f"{p}_{a}" for p in POINTS for a in ("x", "y")], point_rows))
    return dict(images=len(samples), boxes=sum(1 for r in box_rows if r[1]), landmark_images=len(point_rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="derive boxes.csv and landmarks.csv from segmentation masks")
    p.add_argument("data", type=Path, help="segmentation data folder (images/ + masks/, or masks beside images)")
    p.add_argument("out", type=Path, help="folder for boxes.csv, instances.json and landmarks.csv")
    p.add_argument("--mask-mode", choices=("auto", "binary", "ids"), default="auto",
                   help="as finetune.mask_mode: binary = foreground where the value is >= 128")
    args = p.parse_args(argv)
    try:
        counts = derive_annotations(args.data, args.out, args.mask_mode)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{counts['images']} images, {counts['boxes']} boxes, {counts['landmark_images']} images with "
          f"landmarks -> {args.out} (use finetune.data={args.data} finetune.csv={args.out}/boxes.csv, instances.json or landmarks.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
