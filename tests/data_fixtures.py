"""Small shard directories for the loader tests, written with the real tar writer + DALI index.

`write_shards` makes grayscale JPEGs (smooth random texture, or a ramp whose orientation shows flips
and whose value span shows the crop size), ontology label vectors, and a manifest in the format of
docs/architecture.md. It returns the expected label vector of every key.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from echocare_dist.curation.tario import ShardWriter

RAMP_X, RAMP_Y, RAMP_BASE = 150.0, 60.0, 30.0  # gray = base + RAMP_X * x/W + RAMP_Y * y/H


def _image(rng: np.random.Generator, pattern: str, width: int, height: int) -> np.ndarray:
    if pattern == "ramp":
        x = np.linspace(0, 1, width)[None, :]
        y = np.linspace(0, 1, height)[:, None]
        return np.clip(RAMP_BASE + RAMP_X * x + RAMP_Y * y, 0, 255).astype(np.uint8)
    coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(root: Path, ontology, counts=(13, 11, 9, 7), *, size=(96, 72), pattern: str = "noise",
                 seed: int = 0, truncated_jpeg: tuple[int, int] | None = None, ontology_hash: str | None = None) -> dict:
    """Shards with counts[i] samples each; `truncated_jpeg=(shard, index)` halves that sample's JPEG.

    Returns {key: int8 label vector}. Keys are 16 hex chars, unique across the directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(ontology.names)
    labels, entries, k = {}, [], 0
    for s, count in enumerate(counts):
        path = root / f"shard-{s:06d}.tar"
        with ShardWriter(path) as writer:
            for i in range(count):
                key = f"{seed:04x}{k:012x}"
                k += 1
                named = list(rng.choice(names, size=int(rng.integers(0, 3)), replace=False))
                vec = ontology.label_vector(named)
                jpg = jpeg_bytes(_image(rng, pattern, *size))
                if truncated_jpeg == (s, i):
                    jpg = jpg[: len(jpg) // 2]
                meta = {"source": "fixture", "path": f"img {k}.png", "frame": None, "labels": named,
                        "width": size[0], "height": size[1], "crop": None, "ontology_hash": ontology.hash}
                writer.write(key, {"jpg": jpg, "lbl": vec.tobytes(), "json": json.dumps(meta).encode()})
                labels[key] = vec
        info = writer.info
        entries.append({"name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256})
    manifest = {"ontology_hash": ontology_hash or ontology.hash, "ontology_nodes": len(ontology),
                "num_samples": sum(counts), "shards": entries, "per_source": {"fixture": sum(counts)},
                "per_node": {}, "rejected": {}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return labels


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    size = Path(path).stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
