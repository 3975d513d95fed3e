"""Looking at shards: a text summary of a manifest and a PNG contact sheet of random samples."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_open
from ..ontology import Ontology
from ..shardfmt import Manifest, ShardReader


def printable(text: str) -> str:
    """`text` safe to print whatever bytes the file names in it held: a name that is not UTF-8
    arrives as surrogate escapes (os.fsdecode), which no terminal encoding accepts; the bytes
    are shown as \\xNN instead."""
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (e.g. from JSON)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def format_summary(manifest: Manifest, top_nodes: int = 12) -> str:
    shards = manifest.shards
    total = sum(s.bytes for s in shards)
    lines = [f"{manifest.num_samples} samples in {len(shards)} shards ({total / 2**20:.1f} MiB), "
             f"ontology {manifest.ontology_hash} ({manifest.ontology_nodes} nodes)"]
    sources = manifest.sources or [{"name": k, "samples": v} for k, v in manifest.per_source.items()]
    width = max([len(s["name"]) for s in sources] + [6])
    lines.append(f"  {'source':<{width}}  {'files':>7}  {'samples':>8}  {'rejected':>8}")
    for s in sources:
        lines.append(f"  {s['name']:<{width}}  {s.get('files', ''):>7}  {s['samples']:>8}  {s.get('rejected', ''):>8}")
    rejected = manifest.rejected
    lines.append("  rejected: " + (", ".join(f"{r} {v['count']}" for r, v in rejected.items()) or "none"))
    for reason, v in rejected.items():
        for item in v.get("details", [])[:3]:
            of = item.get("of")
            why = item.get("error") or item.get("detail") or (
                f"of {of['path']}" + (f" frame {of['frame']}" if of.get("frame") is not None else "") if of else "")
            frame = f" frame {item['frame']}" if item.get("frame") is not None else ""
            lines.append(f"    {reason}: {item['path']}{frame}: {why}")
    ignored = (manifest.ignored or {}).get("count", 0)
    if ignored:
        lines.append(f"  ignored {ignored} non-media file(s)")
    excluded = (manifest.excluded or {}).get("count", 0)
    if excluded:
        lines.append(f"  excluded {excluded} file(s) by the mapping's exclude: globs")
    if manifest.label_conflicts:
        policy = manifest.label_conflicts[0].get("policy", "")
        lines.append(f"  label conflicts: {len(manifest.label_conflicts)} duplicate group(s) filed under "
                     f"different labels (curation.label_conflict={policy})")
        for c in manifest.label_conflicts[:3]:
            others = "; ".join(f"{o['path']} {o['labels']}" for o in c["others"][:3])
            lines.append(f"    {c['path']} {c['labels']} vs {others} -> {c['resolved']}")
    nodes = sorted(((v, k) for k, v in manifest.per_node.items() if v), reverse=True)
    if nodes:
        lines.append("  positives per node: " + ", ".join(f"{k} {v}" for v, k in nodes[:top_nodes])
                     + (f", ... ({len(nodes) - top_nodes} more)" if len(nodes) > top_nodes else ""))
    return printable("\n".join(lines))


def _pick_samples(shard_dir: Path, manifest: Manifest, n: int, seed: int):
    counts = [s.samples for s in manifest.shards]
    total = sum(counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.cumsum([0] + counts)
    by_shard: dict[int, list[int]] = {}
    for g in chosen:
        s = int(np.searchsorted(starts, g, side="right") - 1)
        by_shard.setdefault(s, []).append(int(g - starts[s]))
    for s, positions in by_shard.items():
        with ShardReader(shard_dir / manifest.shards[s].name) as reader:
            for pos in positions:
                yield reader.samples[pos].key, reader.read(pos)


def contact_sheet(shard_dir: str | Path, out_png: str | Path, num: int = 16, ontology: Ontology | None = None,
                  seed: int = 0, tile: int = 192, columns: int | None = None) -> Path:
    """A grid of `num` random samples, each captioned with its source, original path and deepest
    label names (so a mask or a bad crop on the sheet can be traced to its file)."""
    from PIL import Image, ImageDraw, ImageFont

    shard_dir = Path(shard_dir)
    manifest = Manifest.read(shard_dir)
    samples = list(_pick_samples(shard_dir, manifest, num, seed))
    if not samples:
        raise ValueError(f"{shard_dir}: no samples to show")
    cols = columns or int(np.ceil(np.sqrt(len(samples))))
    rows = int(np.ceil(len(samples) / cols))
    font = ImageFont.load_default()
    caption_h = 56
    sheet = Image.new("L", (cols * tile, rows * (tile + caption_h)), 32)
    draw = ImageDraw.Draw(sheet)
    for i, (key, data) in enumerate(samples):
        img = cv2.imdecode(np.frombuffer(data["jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        s = tile / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        sheet.paste(Image.fromarray(img), (x + (tile - img.shape[1]) // 2, y + (tile - img.shape[0]) // 2))
        if ontology is not None:
            names = ontology.deepest_names(np.frombuffer(data["lbl"], np.int8))
        else:
            names = json.loads(data["json"]).get("labels", [])
        prov = json.loads(data["json"])
        text = ", ".join(names) or "(unlabeled)"
        where = textwrap.wrap(f"{prov.get('source', '')}: {prov.get('path', '')}", width=max(8, tile // 6))[:2]
        caption = "\n".join([*where, *textwrap.wrap(text, width=max(8, tile // 7))[:1]])
        draw.text((x + 3, y + tile + 2), printable(f"{key}\n{caption}"), fill=255, font=font)
    out_png = Path(out_png)
    with atomic_open(out_png, "wb") as fh:
        sheet.save(fh, format="PNG")
    return out_png
