"""Crash-safe file writes.

Every file the system produces (shards, indexes, manifests, checkpoints' pointers, configs)
goes through here: write to a temporary sibling, fsync, then rename over the target. A crash
at any point leaves either the old file or the new one, never a truncated mix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Iterator


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is flushed too.
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp(target: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """An exclusive new file beside `target`, created with mode 0666 so the umask decides.

    `tempfile.mkstemp` creates 0600 whatever the umask: shards, manifests and exports written that
    way cannot be read by another user's training job or by a container running as another UID."""
    target = Path(target)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", private: bool = False) -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit it replaces `path` atomically.
    private: mode 0600 whatever the umask, set before the first byte is written (secrets only)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(target)
    try:
        if private:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed: the integrity record of shards, indexes and exports."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
