"""One sample of a shard: its components, its key, its provenance, and the errors of the format.

A sample is three tar members sharing one key:
  {key}.jpg   8-bit grayscale baseline JPEG (GPU-decodable)
  {key}.lbl   C bytes: the ontology-closed label vector as int8 (1 / 0 / -1 ignore); fixed
              length so DALI can batch it without padding
  {key}.json  provenance: PROVENANCE_KEYS (source, original path, frame, label names, size, crop,
              ontology hash); the builder may add more
Keys are 16 hex chars of the pixel hash. They never contain '.', because DALI and webdataset
split the extension at the first dot of the member's base name.
"""
from __future__ import annotations

import re

SAMPLE_EXTS = ("jpg", "lbl", "json")
SAMPLE_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
PROVENANCE_KEYS = ("source", "path", "frame", "labels", "width", "height", "crop", "ontology_hash")


class ShardError(ValueError):
    """The shard directory cannot be used as it is; the message names the file and the value."""


class SampleError(ValueError):
    """One sample cannot be used (short read, missing or wrong-sized label, undecodable image)."""


def split_name(member_name: str) -> tuple[str, str]:
    """('dir/key', 'ext') split at the first dot of the basename, as DALI and webdataset do."""
    slash = member_name.rfind("/") + 1
    dot = member_name.find(".", slash)
    if dot < 0:
        return member_name, ""
    return member_name[:dot], member_name[dot + 1:]


def check_key(key: str) -> None:
    """A key the readers can split back out of a member name (any text without '.' or '/')."""
    if "." in key or "/" in key or not key:
        raise ValueError(f"invalid sample key {key!r}: no '.' or '/' allowed")
