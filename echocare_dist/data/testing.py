"""Small synthetic shard directories for the loader tests and benchmarks/loader.py.

Written with the real shard writer and manifest (echocare_dist.shardfmt), so the loaders read
them exactly like the shard builder's output. The images come from echocare_dist.synth.patterns
("noise", "ramp", "ultrasound"); its ramp constants are re-exported for the loader tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..shardfmt import CHECKSUM_KEY, Manifest, ShardWriter, jpg_checksum, shard_name
from ..synth.patterns import RAMP_BASE, RAMP_X, RAMP_Y, synthetic_image
from ..synth.writers import encode_image

__all__ = ["write_shards", "synthetic_image", "jpeg_bytes", "RAMP_X", "RAMP_Y", "RAMP_BASE"]


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    return encode_image(arr, "jpg", quality)


def _flip_data_bytes(jpg: bytes) -> bytes:
    """Invert 16 bytes in the middle of the scan data (after the SOS marker, before EOI), avoiding
    0xFF/0x00 so no marker is created or destroyed: a decoder still accepts the file."""
    sos = jpg.index(b"\xff\xda")
    mid = (sos + len(jpg)) // 2
    data = bytearray(jpg)
    flipped = 0
    for i in range(mid, len(jpg) - 2):
        if flipped == 16:
            break
        if data[i] in (0x00, 0xFF, 0x7F) or data[i - 1] == 0xFF:
            continue
        data[i] ^= 0x55
        if data[i] in (0x00, 0xFF):
            data[i] ^= 0x55  # would change the marker structure: leave this one
            continue
        flipped += 1
    return bytes(data)


def write_shards(root, ontology, counts=(13, 11, 9, 7), *, size=(96, 72), pattern: str = "noise", seed: int = 0,
                 truncated_jpeg: tuple[int, int] | None = None, missing_label: tuple[int, int] | None = None,
                 short_label: tuple[int, int] | None = None, flipped_jpeg: tuple[int, int] | None = None,
                 ontology_hash: str | None = None,
                 distinct_images: int | None = None, sources: list[str] | None = None) -> dict:
    """Shards with counts[i] samples each; returns {key: int8 label vector}.

    `truncated_jpeg=(shard, index)` halves that sample's JPEG, `missing_label=(shard, index)` leaves
    out its .lbl, `short_label=(shard, index)` drops its last label byte, `flipped_jpeg=(shard, index)`
    inverts bytes in the middle of its entropy-coded data (it still decodes, to wrong pixels); `distinct_images=n` encodes only n
    images and reuses their bytes (fast to write; decoding costs the same); `sources` names the
    provenance source of each sample in write order (default: all "synthetic")."""
    if sources is not None and len(sources) != sum(counts):
        raise ValueError(f"{len(sources)} sources for {sum(counts)} samples")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(ontology.names)
    pool: list[bytes] = []
    labels, entries, k = {}, [], 0
    for s, count in enumerate(counts):
        with ShardWriter(root / shard_name(s)) as writer:
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
                checksum = jpg_checksum(jpg)  # of the intact image: a damaged one no longer matches
                if truncated_jpeg == (s, i):
                    jpg = jpg[: len(jpg) // 2]
                if flipped_jpeg == (s, i):
                    jpg = _flip_data_bytes(jpg)
                meta = {"source": sources[k - 1] if sources is not None else "synthetic", "path": f"image {k}.png", "frame": None, "labels": named,
                        "width": size[0], "height": size[1], "crop": None, "ontology_hash": ontology.hash,
                        CHECKSUM_KEY: checksum}
                components = {"jpg": jpg, "lbl": vec.tobytes(), "json": json.dumps(meta).encode()}
                if missing_label == (s, i):
                    del components["lbl"]
                if short_label == (s, i):
                    components["lbl"] = components["lbl"][:-1]
                writer.write(key, components)
                labels[key] = vec
        entries.append(writer.entry)
    Manifest(ontology_hash=ontology_hash or ontology.hash, ontology_nodes=len(ontology),
             num_samples=int(sum(counts)), shards=entries, per_source=_per_source(sources, int(sum(counts))),
             per_node={}, rejected={}).write(root)
    return labels


def _per_source(sources: list[str] | None, total: int) -> dict[str, int]:
    if sources is None:
        return {"synthetic": total}
    out: dict[str, int] = {}
    for name in sources:
        out[name] = out.get(name, 0) + 1
    return out
