"""One sample of a shard: its components, its key, its provenance, and the errors of the format.

A sample is three tar members sharing one key:
  {key}.jpg   8-bit grayscale baseline JPEG (GPU-decodable)
  {key}.lbl   C bytes: the ontology-closed label vector as int8 (1 / 0 / -1 ignore); fixed
              length so DALI can batch it without padding
  {key}.json  provenance: PROVENANCE_KEYS (source, original path, frame, label names, size, crop,
              ontology hash) and CHECKSUM_KEY ("jpg_crc32": the CRC-32 of the .jpg bytes as 8
              lower-case hex digits); the builder may add more
Keys are 16 hex chars of the pixel hash. They never contain '.', because DALI and webdataset
split the extension at the first dot of the member's base name.

Why a per-sample checksum when the manifest has each tar's SHA-256: hashing a whole tar costs a
full read, so only `shards verify` and `shards build --verify` do it; a flipped byte inside a JPEG
usually still decodes (to garbage). The CRC in the sample's own JSON lets a reader check the one
sample it just read (zlib.crc32 runs at GB/s), and it lives in the JSON because the DALI index
must stay exactly what `wds2idx` writes.
"""
from __future__ import annotations

import re
import zlib

SAMPLE_EXTS = ("jpg", "lbl", "json")
SAMPLE_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
PROVENANCE_KEYS = ("source", "path", "frame", "labels", "width", "height", "crop", "ontology_hash")
CHECKSUM_KEY = "jpg_crc32"


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


def jpg_checksum(jpg: bytes) -> str:
    """The CHECKSUM_KEY value of a sample whose .jpg is `jpg`."""
    return f"{zlib.crc32(jpg) & 0xFFFFFFFF:08x}"


def checksum_problem(jpg: bytes, provenance: dict) -> str | None:
    """Why the sample's .jpg does not match its provenance's checksum (None when it matches)."""
    want = provenance.get(CHECKSUM_KEY)
    if want is None:
        return f"provenance has no {CHECKSUM_KEY} (a shard written before per-sample checksums)"
    got = jpg_checksum(jpg)
    if got != want:
        return f"{CHECKSUM_KEY} of the .jpg is {got}, its provenance says {want!r} (damaged bytes)"
    return None
