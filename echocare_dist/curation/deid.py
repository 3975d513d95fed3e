"""De-identification at build time (docs/deid.md): what may leave the hospital in a shard set.

Source folders are often named after patients ("DOE_JANE_0421/scan 3.png"), so with
`curation.deid` on (the default) nothing of a path enters the shards, their index or the manifest:
- a stored `path` is the *path id*: 24 hex chars of a keyed BLAKE2b of (source name, path
  relative to its root), and sample keys are a keyed hash of the pixel hash (so duplicates still
  meet, but a key cannot be recomputed from a copy of the image by someone without the salt);
- rejected, ignored and excluded files are listed by path id; decoder messages that quote the
  file name have it replaced by the id; the manifest's sources keep their name, not root/mapping;
- DICOM headers contribute only the ALLOWED_DICOM tags (modality, model, pixel spacing, frame
  time); names, IDs, dates, institutions never leave the header.

The salt and the id -> original table live in the *path map*, one JSON file outside the shard
directory (`{out}.paths.json` unless `curation.deid_map` says where), written with mode 0600.
The salt is made once per shard set and reused by every rebuild (`$ECHOCARE_DEID_SALT` gives one
instead, e.g. to share ids between shard sets); a shard set whose map was lost cannot be
rebuilt with the same keys, which is refused rather than silently producing new ones.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_open
from ..shardfmt import Manifest, ShardError
from .outdir import CurationError

SALT_ENV = "ECHOCARE_DEID_SALT"
MAP_FORMAT = 1
MAP_SUFFIX = ".paths.json"
PATH_ID_RE = re.compile(r"^[0-9a-f]{24}$")
# DICOM keyword -> provenance name. Everything else in the header is dropped.
ALLOWED_DICOM = {"Modality": "modality", "ManufacturerModelName": "model", "PixelSpacing": "pixel_spacing",
                 "FrameTime": "frame_time"}
# An ultrasound export usually states pixel spacing here, not in PixelSpacing.
_REGION_SPACING = ("PhysicalDeltaX", "PhysicalDeltaY")


def default_map_path(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}{MAP_SUFFIX}"


def _keyed(salt: str, data: bytes, size: int) -> str:
    return hashlib.blake2b(data, key=hashlib.sha256(salt.encode()).digest(), digest_size=size).hexdigest()


def sample_key(salt: str, pixel_key: str) -> str:
    """16 hex chars, like the pixel hash it replaces (the shard format's key); equal pixels, equal keys."""
    return _keyed(salt, b"key\0" + bytes.fromhex(pixel_key), 8)


def salt_id(salt: str) -> str:
    """A public name of the salt (the manifest records it): tells which map belongs to which shards."""
    return hashlib.sha256(f"echocare-deid-salt:{salt}".encode()).hexdigest()[:16]


@dataclass
class Deid:
    """The salt of one shard set and the path-id table being collected for its map."""
    salt: str
    map_path: Path
    paths: dict[str, list[str]] = field(default_factory=dict)   # path id -> [source, original]

    @property
    def salt_id(self) -> str:
        return salt_id(self.salt)

    def path_id(self, source: str, path: str) -> str:
        """The public id of `path` (relative to the source root, or absolute) in `source`; recorded."""
        # surrogateescape: a file name that is not UTF-8 arrives as escapes (os.fsdecode)
        pid = _keyed(self.salt, f"path\0{source}\0{path}".encode("utf-8", "surrogateescape"), 12)
        self.paths[pid] = [source, path]
        return pid


def open_deid(out_dir: Path, enabled: bool, map_setting: str = "") -> Deid | None:
    """The de-identification of a build into `out_dir` (None when `curation.deid` is off): the
    salt of its existing path map, else `$ECHOCARE_DEID_SALT`, else a new random one."""
    if not enabled:
        return None
    out_dir = Path(out_dir).resolve()
    path = Path(map_setting).expanduser().resolve() if map_setting else default_map_path(out_dir)
    if path == out_dir or out_dir in path.parents:
        raise CurationError(f"curation.deid_map={str(path)!r} lies inside the shard directory {out_dir}: "
                            f"the path map must never travel with the shards")
    env = os.environ.get(SALT_ENV, "")
    if env and len(env) < 16:
        raise CurationError(f"${SALT_ENV} must be at least 16 characters (a secret), got {len(env)}")
    previous = read_path_map(path) if path.exists() else {"salt": "", "paths": {}}
    salt = previous["salt"]
    if salt and env and env != salt:
        raise CurationError(f"${SALT_ENV} differs from the salt stored in the path map {path}; unset it or "
                            f"use another shard directory")
    salt = salt or env
    with contextlib.suppress(ShardError):
        built = (Manifest.read(out_dir).deid or {}).get("salt_id")
        if built and built != salt_id(salt):
            raise CurationError(f"{out_dir} was built with a salt whose path map is not at {path} (salt id "
                                f"{built}); restore that map (or set curation.deid_map / ${SALT_ENV}), or "
                                f"delete the shards to build them with new keys")
    # Ids of files gone since an earlier build stay resolvable (that build's shards may still be about).
    return Deid(salt or secrets.token_hex(32), path, dict(previous["paths"]) if salt else {})


def scrub(text: str, absolute: str, relpath: str, public: str) -> str:
    """`text` (a decoder's message) with every form of the file's name replaced by its public id."""
    if public == absolute:
        return text
    names = {absolute, relpath, os.path.basename(relpath)}
    names |= {repr(n)[1:-1] for n in names}  # as quoted by `'%r' % path` (escapes, surrogates)
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, public)
    return text


def dicom_metadata(path: str) -> dict:
    """The ALLOWED_DICOM tags of a DICOM file's header (absent ones left out); {} when unreadable
    (the decoder reports the file as corrupt)."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the pixel decoder names the problem
        return {}
    out = {}
    for keyword, name in ALLOWED_DICOM.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[name] = [float(v) for v in value] if keyword == "PixelSpacing" else (
            float(value) if keyword == "FrameTime" else str(value))
    regions = ds.get("SequenceOfUltrasoundRegions")
    if "pixel_spacing" not in out and regions:
        first = regions[0]
        if all(k in first for k in _REGION_SPACING):
            # PhysicalDelta is in the region's physical units (cm for B-mode); PixelSpacing is mm.
            out["pixel_spacing"] = [float(first.PhysicalDeltaY) * 10.0, float(first.PhysicalDeltaX) * 10.0]
    return out


# ---------------------------------------------------------------------------------------------
# the path map
# ---------------------------------------------------------------------------------------------
def write_path_map(deid: Deid, out_dir: Path, sources: list) -> Path:
    """Write the restricted map: salt, sources' roots and mappings, every path id -> original."""
    doc = {"format": MAP_FORMAT, "salt": deid.salt, "salt_id": deid.salt_id, "shards": str(out_dir),
           "sources": {s.name: {"root": str(s.root), "mapping": str(s.mapping)} for s in sources},
           "paths": dict(sorted(deid.paths.items()))}
    path = deid.map_path
    # The one file that does not follow the umask: it holds the patient-identifying paths and the
    # salt, so only its owner may read it, whatever the group-readable umask of the shard set.
    with atomic_open(path, "w", private=True) as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    return path


def read_path_map(path: Path) -> dict:
    """The path map at `path`, checked; raises CurationError naming the file and what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CurationError(f"path map {path} is missing (it is written beside the shard directory by "
                            f"`echocare shards build`; pass --map FILE if it lives elsewhere)") from None
    except PermissionError:
        raise CurationError(f"path map {path}: permission denied (it is readable by its owner only)") from None
    except (OSError, ValueError) as exc:
        raise CurationError(f"path map {path}: cannot be read ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != MAP_FORMAT:
        raise CurationError(f"path map {path}: not an echocare path map of format {MAP_FORMAT}")
    for key, kind in (("salt", str), ("paths", dict), ("sources", dict)):
        if not isinstance(doc.get(key), kind) or (key == "salt" and not doc[key]):
            raise CurationError(f"path map {path}: '{key}' missing or not a {kind.__name__}")
    return doc


# ---------------------------------------------------------------------------------------------
# the builder's hooks
# ---------------------------------------------------------------------------------------------
def hides(deid: Deid | None, source) -> bool:
    """Whether `source`'s paths are replaced by path ids (mapping `deid: false` opts one out)."""
    return deid is not None and source.deid


def public_paths(deid: Deid | None, source, paths: list[str]) -> list[str]:
    """`paths` of `source` as the manifest may show them."""
    return [deid.path_id(source.name, p) for p in paths] if hides(deid, source) else list(paths)


def public_source(detail: dict, source, deid: Deid | None) -> dict:
    """A manifest `sources` entry without the root and mapping locations when hidden (they name
    hospitals and, as often, patients; the path map keeps them)."""
    if not hides(deid, source):
        return detail
    return {k: v for k, v in detail.items() if k not in ("root", "mapping")} | {"deid": True}


def manifest_section(deid: Deid | None, sources: list, text_action: str, flagged: list[dict]) -> dict:
    """The manifest's `deid` entry (format 2)."""
    section: dict = {"enabled": deid is not None}
    if deid is not None:
        section["salt_id"] = deid.salt_id
        section["sources"] = [s.name for s in sources if s.deid]
    section["burned_in_text"] = {"action": text_action, "flagged": len(flagged), "samples": flagged}
    return section


# ---------------------------------------------------------------------------------------------
# looking originals up (`echocare shards lookup`)
# ---------------------------------------------------------------------------------------------
def _sample_paths(shard_dir: Path, keys: set[str]) -> dict[str, tuple[str, object]]:
    """key -> (stored path, frame) for the sample keys wanted, read from the shards' JSON members."""
    from ..shardfmt import ShardReader
    found: dict[str, tuple[str, object]] = {}
    for entry in Manifest.read(shard_dir).shards:
        with ShardReader(shard_dir / entry.name) as reader:
            for sample in reader.samples:
                if sample.key in keys:
                    off, size = sample.components["json"]
                    prov = json.loads(reader.read_at(off, size, "json"))
                    found[sample.key] = (prov["path"], prov.get("frame"))
    return found


def lookup(shard_dir: Path, ids: list[str], map_path: Path | None = None) -> dict[str, dict]:
    """{id: {source, path (the original, absolute), frame?}} for sample keys and path ids of the
    shard set in `shard_dir`; needs read access to its path map."""
    shard_dir = Path(shard_dir).resolve()
    doc = read_path_map(Path(map_path) if map_path else default_map_path(shard_dir))
    samples = _sample_paths(shard_dir, {i for i in ids if i not in doc["paths"]})
    out = {}
    for ident in ids:
        pid, frame = (ident, None) if ident in doc["paths"] else samples.get(ident, (None, None))
        if pid not in doc["paths"]:
            raise CurationError(f"{ident!r} is neither a sample key nor a path id of {shard_dir} "
                                f"(path map {doc.get('shards')})")
        source, path = doc["paths"][pid]
        root = doc["sources"].get(source, {}).get("root")
        full = path if os.path.isabs(path) or not root else str(Path(root) / path)
        out[ident] = {"source": source, "path": full} | ({"frame": frame} if frame is not None else {})
    return out


def map_entries(shard_dir: Path, map_path: Path | None = None) -> dict[str, tuple[str, str]]:
    """path id -> (source, the original file, absolute) for every path id of the shard set."""
    doc = read_path_map(Path(map_path) if map_path else default_map_path(Path(shard_dir).resolve()))
    roots = {name: s.get("root") for name, s in doc["sources"].items()}
    return {pid: (source, path if os.path.isabs(path) or not roots.get(source) else str(Path(roots[source]) / path))
            for pid, (source, path) in doc["paths"].items()}


def originals(shard_dir: Path, map_path: Path | None = None) -> dict[str, str]:
    """path id -> the original file (absolute); reads the shard set's path map."""
    return {pid: path for pid, (_, path) in map_entries(shard_dir, map_path).items()}
