"""Segmentation data in folders: which mask belongs to which image, and which pairs are usable.

Layouts, tried in this order:
1. `data/images/**` + `data/masks/**` (same relative folder on both sides);
2. masks beside their images anywhere under `data` (BUSI: `benign (1).png` next to
   `benign (1)_mask.png` and `benign (1)_mask_1.png`).
Within a layout a mask belongs to an image of the same folder when
- `finetune.image_pattern` / `finetune.mask_pattern` are set: both stems match their pattern
  with the same `{id}` (`Test_Image_7.png` <-> `mask_7.png`);
- otherwise: the mask's stem is the image's stem, or the stem + `finetune.mask_suffix`,
  optionally followed by `_N` (several masks of one image, merged: union of their foreground).
In layout 2 a file is a mask when it has the mask suffix, matches `mask_pattern`, or has a
mask-like name by the curation rule (echocare_dist/curation/masklike.py).

Bad input never ends in a traceback: a mask whose image is missing is skipped and counted
(`mask_without_image`); a mask whose aspect ratio differs from its image's by more than
MAX_ASPECT_ERROR is skipped (`mask_size_mismatch`: it cannot be the same frame; same aspect at
another size is resized); an all-background mask is kept (a normal case, it counts in the
"empty-empty" Dice) or skipped with `finetune.empty_masks=skip` (`empty_mask`), counted either
way; an image without any mask, a colour mask or an unreadable 16-bit mask is an error that
names the file.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..curation.masklike import is_mask_like_name
from .data import DataError, Sample, images_under, read_mask

MAX_ASPECT_ERROR = 0.05  # relative; resampled or cropped-by-a-pixel masks stay well inside it


def stem_regex(pattern: str) -> re.Pattern:
    """`mask_{id}` -> a regex over whole stems with the id as group 'id' (the rest literal)."""
    head, tail = pattern.split("{id}")
    return re.compile(re.escape(head) + r"(?P<id>.+?)" + re.escape(tail) + r"$")


def _base_stem(mask: Path, suffix: str) -> str | None:
    """The image stem a `<stem><suffix>[_N]` mask names, or None when the name has no suffix."""
    m = re.match(r"^(?P<stem>.*?)" + re.escape(suffix) + r"(_\d+)?$", mask.stem)
    return m.group("stem") if m and m.group("stem") else None


def _pair(images: list[tuple[Path, str]], masks: list[tuple[Path, str]], ft) -> tuple[dict, list[Path]]:
    """image -> sorted masks, and the masks that belong to no image."""
    by_key: dict[tuple[str, str], Path] = {}
    img_re = stem_regex(ft.image_pattern) if ft.image_pattern else None
    mask_re = stem_regex(ft.mask_pattern) if ft.mask_pattern else None
    for img, rel in images:
        if img_re is not None:
            m = img_re.match(img.stem)
            if m:
                by_key.setdefault((rel, m.group("id")), img)
        else:
            by_key.setdefault((rel, img.stem), img)
    pairs: dict[Path, list[Path]] = defaultdict(list)
    orphans = []
    for mask, rel in masks:
        if mask_re is not None:
            m = mask_re.match(mask.stem)
            keys = [(rel, m.group("id"))] if m else []
        else:
            base = _base_stem(mask, ft.mask_suffix)
            keys = [(rel, mask.stem)] + ([(rel, base)] if base is not None else [])
        img = next((by_key[k] for k in keys if k in by_key and by_key[k] != mask), None)
        if img is None:
            orphans.append(mask)
        else:
            pairs[img].append(mask)
    return {img: sorted(ms) for img, ms in pairs.items()}, orphans


def _is_beside_mask(path: Path, ft) -> bool:
    if _base_stem(path, ft.mask_suffix) is not None:
        return True
    if ft.mask_pattern and stem_regex(ft.mask_pattern).match(path.stem):
        return True
    return is_mask_like_name(path)


def discover_segmentation_folders(root: Path, ft) -> tuple[list[Sample], dict[str, list[str]]]:
    images_dir, masks_dir = root / "images", root / "masks"
    skipped: dict[str, list[str]] = {}
    if images_dir.is_dir() and masks_dir.is_dir():
        images = [(p, p.parent.relative_to(images_dir).as_posix()) for p in images_under(images_dir)]
        masks = [(p, p.parent.relative_to(masks_dir).as_posix()) for p in images_under(masks_dir)]
        where = f"in {masks_dir}"
    else:
        files = images_under(root)
        masks = [(p, p.parent.relative_to(root).as_posix()) for p in files if _is_beside_mask(p, ft)]
        mask_set = {p for p, _ in masks}
        images = [(p, p.parent.relative_to(root).as_posix()) for p in files if p not in mask_set]
        where = "beside it"
        if not masks:
            raise DataError(f"{root}: no segmentation masks found: use images/ and masks/ sub-folders, masks beside "
                            f"their images named <stem>{ft.mask_suffix}.png, finetune.image_pattern + "
                            f"finetune.mask_pattern, or finetune.csv (columns path,mask)")
    if not images:
        raise DataError(f"no images under {images_dir if where != 'beside it' else root}")
    pairs, orphans = _pair(images, masks, ft)
    if orphans:
        skipped["mask_without_image"] = [p.relative_to(root).as_posix() for p in orphans]
    missing = [img for img, _ in images if img not in pairs]
    if missing:
        how = (f"a stem matching {ft.mask_pattern!r} with the id of {ft.image_pattern!r}" if ft.mask_pattern
               else f"the same stem or stem + {ft.mask_suffix!r} [+ _N]")
        raise DataError(f"{len(missing)} image(s) have no mask {where} (looked for {how}), e.g. {missing[0]}")
    samples = [Sample(img, tuple(pairs[img]), img.relative_to(root).as_posix()) for img, _ in images]
    return samples, skipped


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def check_masks(samples: list[Sample], ft, root: Path) -> tuple[list[Sample], set[int], dict[str, list[str]]]:
    """Read every mask once: the usable samples, the mask values they hold, and counted skips."""
    kept, values = [], set()
    skipped: dict[str, list[str]] = defaultdict(list)  # reason -> paths; `*_kept` reasons are only counted
    for s in samples:
        mask = read_mask(s.target)
        ih, iw = _image_size(s.image)
        mh, mw = mask.shape
        if abs((mh / mw) / (ih / iw) - 1.0) > MAX_ASPECT_ERROR:
            skipped["mask_size_mismatch"].append(f"{s.key} ({iw}x{ih}) vs mask {mw}x{mh}")
            continue
        present = np.unique(mask)
        if not present.any():
            if ft.empty_masks == "skip":
                skipped["empty_mask"].append(s.key)
                continue
            skipped["empty_mask_kept"].append(s.key)  # counted, not left out: normal cases
        values.update(int(v) for v in present)
        kept.append(s)
    if not kept:
        raise DataError(f"{root}: no usable image/mask pair is left ({ {k: len(v) for k, v in skipped.items()} })")
    return kept, values, dict(skipped)
