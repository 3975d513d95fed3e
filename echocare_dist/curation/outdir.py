"""The output directory of a build: one build at a time (`build_lock`), and what a finished build
left there checked against its manifest (`damaged_shards`) before a rerun calls it up to date.

Lock. `.build.lock` is held with flock for the whole build and names its holder (host, pid, start
time), so a second build is refused with one line that says who holds it. The kernel drops the
lock when its holder dies, so a lock file left by a crash is never in the way. The holder removes
the file while it still holds the lock; a build that opened the old file in between notices (the
inode on disk is another one, or none) and tries again, so two builds never both hold "the" lock.

Check. A rerun with the same inputs finds the manifest's fingerprint unchanged; the shards on disk
may still have been damaged since (a truncated copy, a rewritten index). Always checked, cheaply:
every tar and index exists, the tar has the size the manifest recorded, the index (small) has the
recorded SHA-256. With `--verify` also each tar's full SHA-256 (a read of every byte). A damaged
shard is rewritten from a fresh staging pass; the intact ones are kept as they are.
Records (one JSON per written shard in the staging folder) and manifest entries are converted
here both ways (`keep_intact_shards`, `shard_entries`), for the main and the validation shards.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..atomic import atomic_write_json, file_sha256
from ..shardfmt import Manifest, ShardEntry, index_text

log = logging.getLogger(__name__)

LOCK_NAME = ".build.lock"


class CurationError(RuntimeError):
    """The build cannot go on (another build holds the directory, a worker died, staging is damaged)."""


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(errors="backslashreplace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


@contextlib.contextmanager
def build_lock(out_dir: Path):
    """Hold `out_dir`'s build lock, or raise CurationError naming the build that holds it."""
    lock_path = out_dir / LOCK_NAME
    while True:
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise CurationError(f"{out_dir}: another `shards build` is running there ({_holder(lock_path)}); "
                                f"wait for it to finish or stop it") from None
        except OSError:  # file systems without flock (some NFS mounts): go on unguarded
            break
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()  # the previous holder removed the file after we opened it: lock the new one
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        fh.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # still holding it: see the module doc
        fh.close()


def damaged_shards(out_dir: Path, manifest: Manifest, full: bool) -> dict[str, str]:
    """{shard name: what is wrong} for the shards of `manifest` in `out_dir` (module doc: what is checked)."""
    bad: dict[str, str] = {}
    for entry in manifest.shards:
        tar = out_dir / entry.name
        idx = tar.with_suffix(".idx")
        try:
            if not tar.is_file():
                bad[entry.name] = "tar missing"
            elif not idx.is_file():
                bad[entry.name] = f"index {idx.name} missing"
            elif tar.stat().st_size != entry.bytes:
                bad[entry.name] = f"{tar.stat().st_size} bytes, the manifest recorded {entry.bytes}"
            elif entry.idx_sha256 is not None and file_sha256(idx) != entry.idx_sha256:
                bad[entry.name] = f"index {idx.name} differs from the one the build wrote"
            elif entry.idx_sha256 is None and idx.read_bytes() != index_text(tar).encode():
                bad[entry.name] = f"index {idx.name} differs from the index of the tar"
            elif full and file_sha256(tar) != entry.sha256:
                bad[entry.name] = "SHA-256 differs from the manifest"
        except Exception as exc:  # noqa: BLE001 - an unreadable file is damage, not a crash of the check
            bad[entry.name] = f"unreadable ({type(exc).__name__}: {exc})"
    return bad


def keep_intact_shards(records_dir: Path, manifest: Manifest, damaged: dict[str, str]) -> None:
    """Write the write stage's records of the intact shards, so a rebuild rewrites only the damaged ones
    (the write stage still compares each record with the plan and the files' SHA-256 first)."""
    records_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest.shards:
        if entry.name not in damaged and entry.idx_sha256 is not None:
            atomic_write_json(records_dir / f"{Path(entry.name).stem}.json", entry.to_dict())


def shard_entries(records: list[dict]) -> list[ShardEntry]:
    """The manifest entries of the write stage's records (the inverse of the records written above)."""
    return [ShardEntry(*(r.get(k) for k in ("name", "samples", "bytes", "sha256", "keys_sha256", "idx_sha256")))
            for r in records]
