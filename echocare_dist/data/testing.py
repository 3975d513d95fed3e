"""Small synthetic shard directories for the loader tests and benchmarks/loader.py.

Written with the real tar writer (GNU tar + DALI index) and a manifest in the format of
docs/architecture.md, so the loaders read them exactly like the shard builder's output. Patterns:
"noise" (smooth random texture), "ramp" (gray = 30 + 150 x/W + 60 y/H: the gradient's sign shows
flips and its span the crop width) and "ultrasound" (a speckled B-mode-like sector, for realistic
JPEG sizes and decode cost).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write_json
from ..curation.tario import ShardWriter

RAMP_X, RAMP_Y, RAMP_BASE = 150.0, 60.0, 30.0


def synthetic_image(rng: np.random.Generator, pattern: str, width: int, height: int) -> np.ndarray:
    if pattern == "ramp":
        x = np.linspace(0, 1, width)[None, :]
        y = np.linspace(0, 1, height)[:, None]
        return np.clip(RAMP_BASE + RAMP_X * x + RAMP_Y * y, 0, 255).astype(np.uint8)
    coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    tissue = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    if pattern == "noise":
        return np.clip(tissue + rng.normal(0, 12, tissue.shape), 0, 255).astype(np.uint8)
    if pattern != "ultrasound":
        raise ValueError(f"unknown pattern {pattern!r}: noise, ramp or ultrasound")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(xx - width / 2, yy + 0.1 * height)
    angle = np.abs(np.arctan2(xx - width / 2, yy + 0.1 * height))
    sector = (angle < 0.75) & (r > 0.15 * height) & (r < 1.05 * height)
    # Speckle grain of ~3 px, as in B-mode images (and their JPEG sizes: ~70 KB at 640x480).
    grain = rng.rayleigh(0.6, (height // 3 + 1, width // 3 + 1)).astype(np.float32)
    speckle = np.asarray(Image.fromarray(grain).resize((width, height), Image.BILINEAR))
    img = np.clip(tissue * speckle * np.exp(-r / (2.5 * height)), 0, 255) * sector
    return img.astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(root, ontology, counts=(13, 11, 9, 7), *, size=(96, 72), pattern: str = "noise", seed: int = 0,
                 truncated_jpeg: tuple[int, int] | None = None, missing_label: tuple[int, int] | None = None,
                 short_label: tuple[int, int] | None = None,
                 ontology_hash: str | None = None,
                 distinct_images: int | None = None) -> dict:
    """Shards with counts[i] samples each; returns {key: int8 label vector}.

    `truncated_jpeg=(shard, index)` halves that sample's JPEG, `missing_label=(shard, index)` leaves
    out its .lbl, `short_label=(shard, index)` drops its last label byte; `distinct_images=n` encodes only n
    images and reuses their bytes (fast to write; decoding costs the same)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(ontology.names)
    pool: list[bytes] = []
    labels, entries, k = {}, [], 0
    for s, count in enumerate(counts):
        with ShardWriter(root / f"shard-{s:06d}.tar") as writer:
            for i in range(count):
                key = f"{seed:04x}{k:012x}"
                named = [str(n) for n in rng.choice(names, size=int(rng.integers(0, 3)), replace=False)]
                vec = ontology.label_vector(named)
                if distinct_images and len(pool) >= distinct_images:
                    jpg = pool[k % distinct_images]
                else:
                    jpg = jpeg_bytes(synthetic_image(rng, pattern, *size))
                    pool.append(jpg)
                k += 1
                if truncated_jpeg == (s, i):
                    jpg = jpg[: len(jpg) // 2]
                meta = {"source": "synthetic", "path": f"image {k}.png", "frame": None, "labels": named,
                        "width": size[0], "height": size[1], "crop": None, "ontology_hash": ontology.hash}
                components = {"jpg": jpg, "lbl": vec.tobytes(), "json": json.dumps(meta).encode()}
                if missing_label == (s, i):
                    del components["lbl"]
                if short_label == (s, i):
                    components["lbl"] = components["lbl"][:-1]
                writer.write(key, components)
                labels[key] = vec
        info = writer.info
        entries.append({"name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256})
    atomic_write_json(root / "manifest.json", {
        "ontology_hash": ontology_hash or ontology.hash, "ontology_nodes": len(ontology),
        "num_samples": int(sum(counts)), "shards": entries, "per_source": {"synthetic": int(sum(counts))},
        "per_node": {}, "rejected": {}})
    return labels
