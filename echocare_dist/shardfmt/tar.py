"""GNU tars of samples: the atomic writer, random access through the index, and tar sizing.

Tars are GNU format because DALI's reader rejects PAX headers. A tar is written under a temporary
name and renamed into place only when complete, together with its index, so a crash never
leaves a half-written shard that looks finished.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import _fsync_dir, create_temp, file_sha256
from .index import TAR_BLOCK, IndexedSample, read_index, write_index
from .manifest import ShardEntry, keys_digest
from .sample import SampleError, check_key

if TYPE_CHECKING:
    import numpy as np

TAR_RECORD = 20 * TAR_BLOCK   # tarfile pads the archive to whole records


def tar_member_bytes(size: np.ndarray | int):
    """Bytes a member of `size` data bytes takes in the tar: header + data padded to blocks."""
    return TAR_BLOCK + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


class ShardWriter:
    """Write one tar atomically: `with ShardWriter(path) as w: w.write(key, {...})`.

    On clean exit the tar is fsynced, its DALI index written, and only then the tar renamed
    into place; `entry` is then its manifest entry. On an exception nothing is left behind but
    the previous file (if any).
    """

    def __init__(self, path: str | os.PathLike, mtime: float = 0.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = create_temp(self.path, ".partial")  # readable by others, as the umask allows
        os.close(fd)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._mtime = mtime  # fixed mtime: the same inputs give byte-identical shards
        self.keys: list[str] = []
        self.entry: ShardEntry | None = None

    def write(self, key: str, components: dict[str, bytes]) -> None:
        check_key(key)
        for ext, data in components.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = self._mtime
            ti.mode = 0o644
            ti.uname = ti.gname = ""
            self._tar.addfile(ti, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> ShardEntry:
        self._tar.close()
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        sha256 = file_sha256(self._tmp)
        # Index first (describes the tmp tar's bytes, which the rename keeps unchanged).
        idx = write_index(self._tmp, self.path.with_suffix(".idx"))
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        self.entry = ShardEntry(self.path.name, len(self.keys), self.path.stat().st_size, sha256,
                                keys_digest(self.keys), file_sha256(idx))
        return self.entry

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


def parse_member_header(header: bytes) -> tuple[str, int]:
    """(name, size) from a 512-byte tar header (GNU base-256 sizes included); SampleError when the
    bytes are no tar header (an index offset that points into member data)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    raw = header[124:136]
    if raw and raw[0] & 0x80:
        return name, int.from_bytes(raw[1:], "big")
    try:
        return name, int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise SampleError(f"no tar header before this offset (size field {bytes(raw)!r} is not octal)") from None


class ShardReader:
    """Random access to one tar through its index: one file handle, the index parsed on first use,
    so reading a sample is one seek + one read per component and skipping one costs nothing."""

    def __init__(self, tar: str | os.PathLike, idx: str | os.PathLike | None = None):
        self.tar = Path(tar)
        self.idx = Path(idx) if idx is not None else self.tar.with_suffix(".idx")
        self._samples: list[IndexedSample] | None = None
        self._fh = None

    @property
    def samples(self) -> list[IndexedSample]:
        if self._samples is None:
            self._samples = read_index(self.idx)
        return self._samples

    def __len__(self) -> int:
        return len(self.samples)

    def read_at(self, offset: int, size: int, what: str) -> bytes:
        if self._fh is None:
            self._fh = open(self.tar, "rb")
        self._fh.seek(offset)
        data = self._fh.read(size)
        if len(data) != size:
            raise SampleError(f"{what}: read {len(data)} of {size} bytes at offset {offset} (tar truncated)")
        return data

    def read(self, i: int) -> dict[str, bytes]:
        """Every component of sample i: {ext: bytes}."""
        key, comps, _ = self.samples[i]
        return {ext: self.read_at(off, size, f"{self.tar.name}/{key}.{ext}") for ext, (off, size) in comps.items()}

    def member_at(self, offset: int) -> tuple[str, int]:
        """(name, size) the tar header says of the member whose data starts at `offset`."""
        if offset < TAR_BLOCK:
            raise SampleError(f"{self.tar.name}: no member data can start at offset {offset} (before any header)")
        return parse_member_header(self.read_at(offset - TAR_BLOCK, TAR_BLOCK, f"{self.tar.name} header"))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
