"""WebDataset shard files: GNU-format tar writing and the DALI index that goes with each tar.

Format of one sample (the contract between the shard builder and both loaders):
  {key}.jpg   8-bit grayscale baseline JPEG (GPU-decodable)
  {key}.lbl   C bytes: the ontology-closed label vector as int8 (1 / 0 / -1 ignore); fixed
              length so DALI can batch it without padding
  {key}.json  provenance: source, original path, frame, labels (names), size, crop, ontology hash
Keys contain no '.', because DALI and webdataset split the extension at the first dot.

Tars are written as GNU format (DALI's reader rejects PAX headers) under a temporary name and
renamed into place only when complete, together with their index, so a crash never leaves a
half-written shard that looks finished.
"""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import _fsync_dir, atomic_write_text, file_sha256  # noqa: F401 (re-exported)

INDEX_VERSION = "v1.2"
SAMPLE_EXTS = ("jpg", "lbl", "json")


def split_name(member_name: str) -> tuple[str, str]:
    """('dir/key', 'ext') split at the first dot of the basename, as DALI and webdataset do."""
    slash = member_name.rfind("/") + 1
    dot = member_name.find(".", slash)
    if dot < 0:
        return member_name, ""
    return member_name[:dot], member_name[dot + 1:]


def dali_index_lines(tar_path: str | os.PathLike) -> list[str]:
    """The DALI webdataset index (same text as the `wds2idx` tool writes) for one tar."""
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            base, ext = split_name(member.name)
            if not base or base.endswith("/"):
                continue
            entry = (ext, member.offset_data, member.size, member.name)
            if base != last:
                bundles.append([entry])
                last = base
            else:
                bundles[-1].append(entry)
    if not bundles:
        raise ValueError(f"{tar_path}: webdataset tar is empty")
    lines = [f"{INDEX_VERSION} {len(bundles)}"]
    lines += [" ".join(" ".join(map(str, comp)) for comp in bundle) for bundle in bundles]
    return lines


def write_dali_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> Path:
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path else tar_path.with_suffix(".idx")
    atomic_write_text(idx_path, "\n".join(dali_index_lines(tar_path)) + "\n")
    return idx_path


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)


class ShardWriter:
    """Write one tar atomically: `with ShardWriter(path) as w: w.write(key, {...})`.

    On clean exit the tar is fsynced, its DALI index written, and only then the tar renamed
    into place. On an exception nothing is left behind but the previous file (if any).
    """

    def __init__(self, path: str | os.PathLike, mtime: float = 0.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._mtime = mtime  # fixed mtime: the same inputs give byte-identical shards
        self.keys: list[str] = []
        self.info: ShardInfo | None = None

    def write(self, key: str, components: dict[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"invalid sample key {key!r}: no '.' or '/' allowed")
        for ext, data in components.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = self._mtime
            ti.mode = 0o644
            ti.uname = ti.gname = ""
            self._tar.addfile(ti, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> ShardInfo:
        self._tar.close()
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        sha256 = file_sha256(self._tmp)
        # Index first (describes the tmp tar's bytes, which the rename keeps unchanged).
        write_dali_index(self._tmp, self.path.with_suffix(".idx"))
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        self.info = ShardInfo(self.path.name, len(self.keys), self.path.stat().st_size,
                              sha256, list(self.keys))
        return self.info

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_dali_index(idx_path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse an index written by `write_dali_index` / `wds2idx`: [(key, {ext: (offset, size)})]."""
    lines = Path(idx_path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{idx_path}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{idx_path}: bad header {lines[0]!r} (expected '{INDEX_VERSION} <count>')")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, found {len(body)} lines")
    samples = []
    for n, line in enumerate(body, start=2):
        tok = line.split()
        if len(tok) % 4:
            raise ValueError(f"{idx_path}:{n}: expected groups of 'ext offset size name', got {line!r}")
        comps, key = {}, None
        for ext, off, size, name in zip(tok[0::4], tok[1::4], tok[2::4], tok[3::4]):
            base, _ = split_name(name)
            if key is not None and base != key:
                raise ValueError(f"{idx_path}:{n}: components of different samples on one line")
            key = base
            comps[ext] = (int(off), int(size))
        samples.append((key, comps))
    return samples
