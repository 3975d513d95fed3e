"""`echocare shards audit DIR --out audit.png`: the original frames with their crop boxes, worst
first, so a person can check in a minute that no crop cuts anatomy, and the samples flagged for
burned-in text (curation/burnedin.py), their text boxes drawn in yellow, right after the failed crops.

Worst = most textured content left outside the box (`crop_discarded` in each sample's JSON), then
the smallest kept share of the frame. Frames the builder refused as `crop_failed` come first
(their box, if any, is not shown: there is none that was trusted). Each tile is captioned with
source, path, labels and the discarded share. Originals are read from the source roots recorded
in the manifest, or, for a de-identified shard set (docs/deid.md), through its restricted path
map when the auditor may read it; without the original (moved, changed, or the map not readable)
a kept sample is shown as stored in its shard (marked [stored], text boxes drawn, no crop box) and
a failed crop as a gray tile saying so. Captions show the stored (de-identified) path.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_open
from ..shardfmt import Manifest, ShardReader
from .deid import map_entries
from .media import iter_frames, media_kind
from .outdir import CurationError


@dataclass
class AuditItem:
    source: str
    path: str            # absolute
    shown: str           # as captioned (relative to the source root when known)
    frame: int | None
    labels: list
    crop: tuple | None
    discarded: float     # 1.0 for crop_failed frames (nothing trusted was kept)
    kept_share: float
    note: str = ""
    text_boxes: list = ()   # burned-in text found inside the crop (original frame coordinates)
    stored: tuple | None = None  # (shard, offset, size, width) of its .jpg: shown when the original is not


def text_flagged(manifest: Manifest) -> list[dict]:
    """The samples the builder flagged for burned-in text [{key, path, frame, boxes}] (format 2)."""
    return ((manifest.deid or {}).get("burned_in_text") or {}).get("samples", [])


def _readable_originals(shard_dir: Path, map_path: Path | None) -> dict[str, tuple[str, str]]:
    try:
        return map_entries(shard_dir, map_path)
    except CurationError:  # not authorised, or no map: tiles say the original is unavailable
        return {}


def audit_items(shard_dir: Path, manifest: Manifest, map_path: Path | None = None) -> list[AuditItem]:
    roots = {s["name"]: Path(s["root"]) for s in manifest.sources or [] if "root" in s}
    hidden = _readable_originals(shard_dir, map_path) if (manifest.deid or {}).get("enabled") else {}
    items: list[AuditItem] = []
    for entry in manifest.shards:
        with ShardReader(shard_dir / entry.name) as reader:
            for sample in reader.samples:
                off, size = sample.components["json"]
                prov = json.loads(reader.read_at(off, size, "json"))
                stored = (entry.name, *sample.components["jpg"], prov["width"]) if "jpg" in sample.components else None
                x0, y0, x1, y1 = prov["crop"]
                area = max(1, prov.get("orig_width", x1) * prov.get("orig_height", y1))
                root = roots.get(prov["source"], Path("."))
                path = hidden.get(prov["path"], ("", ""))[1] if prov.get("deid") else str(root / prov["path"])
                items.append(AuditItem(prov["source"], path, prov["path"], prov.get("frame"),
                                       prov.get("labels", []), (x0, y0, x1, y1),
                                       float(prov.get("crop_discarded", 0.0)), (x1 - x0) * (y1 - y0) / area,
                                       text_boxes=prov.get("text_boxes", []), stored=stored))
    by_root = sorted(roots.items(), key=lambda kv: -len(str(kv[1])))
    for d in manifest.rejected.get("crop_failed", {}).get("details", []):
        if d["path"] in hidden:
            items.append(AuditItem(*hidden[d["path"]], d["path"], d.get("frame"), [], None, 1.0, 0.0,
                                   note=d.get("detail", "crop_failed")))
            continue
        source, shown = next(((n, str(Path(d["path"]).relative_to(r))) for n, r in by_root
                              if str(d["path"]).startswith(str(r) + "/")), ("", d["path"]))
        items.append(AuditItem(source, d["path"], shown, d.get("frame"), [], None, 1.0, 0.0,
                               note=d.get("detail", "crop_failed")))
    # Failed crops, then text flagged, then the worst kept crops.
    items.sort(key=lambda it: (it.crop is not None, not it.text_boxes, -it.discarded, it.kept_share, it.path))
    return items


def _original(item: AuditItem) -> np.ndarray | None:
    kind = media_kind(item.path) if item.path else None
    if kind is None or not Path(item.path).is_file():
        return None
    try:
        for index, gray in iter_frames(Path(item.path), kind, 1):
            if index == item.frame:
                return gray
    except Exception:  # noqa: BLE001 - a file damaged since the build is reported on its tile
        return None
    return None


def stored_view(shard_dir: Path, it: AuditItem) -> tuple[np.ndarray | None, list]:
    """The sample's stored image and its text boxes in that image's coordinates (a de-identified set
    audited without its path map: the stored image is what would leak anyway)."""
    name, offset, size, width = it.stored
    with ShardReader(shard_dir / name) as reader:
        gray = cv2.imdecode(np.frombuffer(reader.read_at(offset, size, name), np.uint8), cv2.IMREAD_GRAYSCALE)
    x0, y0, x1, _ = it.crop
    scale = width / max(1, x1 - x0)
    return gray, [[round((v - o) * scale) for v, o in zip(b, (x0, y0, x0, y0))] for b in it.text_boxes]


def crop_audit(shard_dir: str | Path, out_png: str | Path, num: int = 24, tile: int = 256,
               columns: int | None = None, map_path: Path | None = None) -> tuple[Path, list[AuditItem]]:
    """Render the `num` worst crops; returns the PNG path and the items shown (worst first)."""
    from PIL import Image, ImageDraw, ImageFont

    shard_dir = Path(shard_dir)
    manifest = Manifest.read(shard_dir)
    items = audit_items(shard_dir, manifest, map_path)[:num]
    if not items:
        raise ValueError(f"{shard_dir}: no samples and no crop_failed frames to audit")
    cols = columns or min(len(items), 6)
    rows = -(-len(items) // cols)
    caption_h = 56
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, it in enumerate(items):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        gray, crop, boxes, what = _original(it), it.crop, it.text_boxes, ""
        if gray is None and it.stored is not None:
            (gray, boxes), crop, what = stored_view(shard_dir, it), None, " [stored]"
        if gray is None:
            draw.rectangle((x + 4, y + 4, x + tile - 4, y + tile - 4), fill=(90, 90, 90))
            why = "original missing or changed" if it.path else "de-identified: path map not readable"
            draw.text((x + 8, y + tile // 2), why, fill=(255, 255, 255), font=font)
        else:
            h, w = gray.shape
            s = tile / max(h, w)
            rgb = cv2.cvtColor(cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                                          interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
            if crop is not None:
                x0, y0, x1, y1 = (round(v * s) for v in crop)
                cv2.rectangle(rgb, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 60, 40), 2)
            for box in boxes:
                x0, y0, x1, y1 = (round(v * s) for v in box)
                cv2.rectangle(rgb, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 230, 0), 1)
            sheet.paste(Image.fromarray(rgb), (x + (tile - rgb.shape[1]) // 2, y + (tile - rgb.shape[0]) // 2))
        frame = f" f{it.frame}" if it.frame is not None else ""
        head = f"{it.source}: {'CROP FAILED' if it.crop is None else f'discarded {it.discarded:.1%}'}" + (
            f", TEXT x{len(it.text_boxes)}" if it.text_boxes else "") + what
        body = textwrap.wrap(f"{it.shown}{frame}", width=max(8, tile // 6))[:2]
        labels = ", ".join(it.labels) or ("(unlabeled)" if it.crop is not None else it.note[:60])
        draw.text((x + 3, y + tile + 2), "\n".join([head, *body, labels[:tile // 6]]), fill=(255, 255, 255),
                  font=font)
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as fh:
        sheet.save(fh, format="PNG")
    return out_png, items
