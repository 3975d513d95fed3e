"""The shard directory and its manifest, the commit point of a build.

    shard-000000.tar, shard-000000.idx, ...   tars and their DALI indexes
    manifest.json                             what the directory holds (Manifest)
    config.resolved.yaml                      the configuration that built it

A directory with a manifest holds exactly the shards it lists. Format 1 keys (docs/architecture.md):
ontology_hash, ontology_nodes, num_samples, shards [{name, samples, bytes, sha256, keys_sha256?,
idx_sha256?}], per_source, per_node, rejected {reason: {count, paths, details?}}; the builder adds
what shaped the build (ontology_names, sources, files, staged_samples, ignored, curation,
fingerprint, excluded, label_conflicts). A manifest without "format" predates the field and is
read as format 1. Format 2 adds `deid` (docs/deid.md): {enabled, salt_id?, sources?, burned_in_text:
{action, flagged, samples: [{key, path, frame, boxes}]}}; with de-identification on, every path
the manifest and the samples hold is a path id (curation/deid.py). Format 1 is still read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_json
from .sample import ShardError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
READABLE_FORMATS = (1, 2)
SHARD_RE = re.compile(r"^shard-(\d{6})\.(tar|idx)$")

_REQUIRED = ("ontology_hash", "ontology_nodes", "num_samples", "shards", "per_source", "per_node", "rejected")
_TYPES = {"ontology_hash": (str, "a string"), "ontology_nodes": (int, "an integer"),
          "num_samples": (int, "an integer"), "shards": (list, "a list"), "per_source": (dict, "an object"),
          "per_node": (dict, "an object"), "rejected": (dict, "an object"),
          "ontology_names": (list, "a list"), "sources": (list, "a list"), "files": (int, "an integer"),
          "staged_samples": (int, "an integer"), "ignored": (dict, "an object"), "curation": (dict, "an object"),
          "fingerprint": (str, "a string"), "excluded": (dict, "an object"), "label_conflicts": (list, "a list"),
          "deid": (dict, "an object")}


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def keys_digest(keys: list[str]) -> str:
    """The manifest's `keys_sha256` of a shard: its sample keys in tar order."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int       # size of the tar; a different size on disk means a damaged copy
    sha256: str
    keys_sha256: str | None = None
    idx_sha256: str | None = None   # of the DALI index: a rerun checks it (small) on every build

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Manifest:
    ontology_hash: str
    ontology_nodes: int
    num_samples: int
    shards: list[ShardEntry]
    per_source: dict[str, int]
    per_node: dict[str, int]
    rejected: dict[str, dict]
    format: int = MANIFEST_FORMAT
    ontology_names: list[str] | None = None
    sources: list[dict] | None = None
    files: int | None = None
    staged_samples: int | None = None
    ignored: dict | None = None
    curation: dict | None = None
    fingerprint: str | None = None
    # Optional (older manifests lack them): files the mapping's `exclude:` globs left out
    # {count, paths}, and duplicate groups filed under different labels [{path, labels, resolved,
    # policy, others}] (curation/conflicts.py).
    excluded: dict | None = None
    label_conflicts: list | None = None
    deid: dict | None = None          # format 2: what was de-identified and what was flagged

    def to_dict(self) -> dict:
        order = ("format", "ontology_hash", "ontology_nodes", "ontology_names", "num_samples", "shards",
                 "per_source", "per_node", "rejected", "sources", "files", "staged_samples", "ignored",
                 "curation", "fingerprint", "excluded", "label_conflicts", "deid")
        out = {}
        for key in order:
            value = getattr(self, key)
            if value is not None:
                out[key] = [s.to_dict() for s in value] if key == "shards" else value
        return out

    @classmethod
    def from_dict(cls, data, source: str | os.PathLike = MANIFEST) -> "Manifest":
        if not isinstance(data, dict):
            raise ShardError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", 1)
        if fmt not in READABLE_FORMATS or isinstance(fmt, bool):
            raise ShardError(f"{source}: format={fmt!r} cannot be read by this version "
                             f"(it reads format {', '.join(map(str, READABLE_FORMATS))})")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ShardError(f"{source}: missing key(s) {missing}")
        for key, (kind, what) in _TYPES.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ShardError(f"{source}: {key} must be {what}, got {value!r:.80}")
        shards = [_shard_entry(e, i, source) for i, e in enumerate(data["shards"])]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields and k not in ("shards", "format")},
                   shards=shards, format=fmt)

    @classmethod
    def read(cls, shard_dir: str | os.PathLike) -> "Manifest":
        path = Path(shard_dir) / MANIFEST
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ShardError(f"{path} is missing: build the shards with `echocare shards build` "
                             f"(an unfinished or interrupted build has none)") from None
        except OSError as exc:
            raise ShardError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ShardError(f"{path}: invalid JSON ({exc})") from exc
        return cls.from_dict(data, path)

    def write(self, shard_dir: str | os.PathLike) -> Path:
        """Atomically: the directory either keeps its old manifest or has the whole new one."""
        path = Path(shard_dir) / MANIFEST
        atomic_write_json(path, self.to_dict())
        return path


def _shard_entry(e, i: int, source) -> ShardEntry:
    try:
        entry = ShardEntry(e["name"], e["samples"], e["bytes"], e["sha256"], e.get("keys_sha256"),
                           e.get("idx_sha256"))
    except (KeyError, TypeError) as exc:
        raise ShardError(f"{source}: shards[{i}] needs name, samples, bytes and sha256, got {e!r:.120}") from exc
    types_ok = (isinstance(entry.name, str) and isinstance(entry.sha256, str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in (entry.samples, entry.bytes))
                and all(isinstance(v, (str, type(None))) for v in (entry.keys_sha256, entry.idx_sha256)))
    if not types_ok:
        raise ShardError(f"{source}: shards[{i}] needs name and sha256 strings, samples and bytes integers, "
                         f"got {e!r:.120}")
    if "/" in entry.name or entry.name in ("", ".", ".."):
        # Loaders open root / name: a path would reach outside the shard directory.
        raise ShardError(f"{source}: shards[{i}].name={entry.name!r} is not a file name in the shard directory")
    return entry
