"""The DALI webdataset index of one tar: written as `wds2idx` writes it, read under one rule.

Text, one header line and one line per sample:
    v1.2 <samples>
    <ext> <offset> <size> <member name> [<ext> <offset> <size> <member name> ...]
`offset` is where the member's data starts (its header is the 512 bytes before). Components of a
sample are consecutive members with the same base name (split at the first dot).

The reading rule, the same for every reader in the project: versions v1.1 (the same without the
member names) and v1.2 are accepted, as DALI's reader accepts them; the sample count must be
positive and match the lines (blank lines are ignored); offsets are multiples of the tar block;
in v1.2 the components of one line name one sample. Anything else is a ShardError naming the
file and line.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import NamedTuple

from ..atomic import atomic_write_text
from .sample import ShardError, split_name

INDEX_VERSION = "v1.2"                 # what we write (and wds2idx writes)
INDEX_VERSIONS = ("v1.1", "v1.2")      # what we read: v1.1 lacks the member names
TAR_BLOCK = 512


class IndexedSample(NamedTuple):
    key: str | None                          # None in a v1.1 index, which names no members
    components: dict[str, tuple[int, int]]   # ext -> (data offset, size)
    line: int                                # line of the index file, for messages


def index_lines(tar_path: str | os.PathLike) -> list[str]:
    """The lines of the index of one tar, the same text `wds2idx` writes (ShardError if empty)."""
    bundles: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            base, ext = split_name(member.name)
            if not base or base.endswith("/"):
                continue  # hidden files, as wds2idx skips them
            entry = (ext, member.offset_data, member.size, member.name)
            if base != last:
                bundles.append([entry])
                last = base
            else:
                bundles[-1].append(entry)
    if not bundles:
        raise ShardError(f"{tar_path}: webdataset tar is empty")
    lines = [f"{INDEX_VERSION} {len(bundles)}"]
    lines += [" ".join(" ".join(map(str, comp)) for comp in bundle) for bundle in bundles]
    return lines


def index_text(tar_path: str | os.PathLike) -> str:
    return "\n".join(index_lines(tar_path)) + "\n"


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> Path:
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path else tar_path.with_suffix(".idx")
    atomic_write_text(idx_path, index_text(tar_path))
    return idx_path


def _header(path: Path, lines: list[str]) -> tuple[str, int]:
    first = lines[0] if lines else ""
    head = first.split()
    if len(head) != 2 or head[0] not in INDEX_VERSIONS or not head[1].isdigit():
        raise ShardError(f"{path}:1: not a DALI webdataset index (first line {first[:80]!r}; expected "
                         f"'<version> <samples>' with version {' or '.join(INDEX_VERSIONS)})")
    if int(head[1]) == 0:
        raise ShardError(f"{path}:1: the sample count must be positive (first line {first!r})")
    return head[0], int(head[1])


def read_index(idx_path: str | os.PathLike) -> list[IndexedSample]:
    """Parse an index written by `write_index` / `wds2idx`, under the rule of the module doc."""
    path = Path(idx_path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise ShardError(f"cannot read index {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ShardError(f"{path}: not a DALI webdataset index (not UTF-8 text: {exc.reason})") from exc
    version, count = _header(path, lines)
    named = version == "v1.2"
    width = 4 if named else 3
    form = "'ext offset size name'" if named else "'ext offset size'"
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        tok = line.split()
        if not tok:
            continue
        if len(tok) % width:
            raise ShardError(f"{path}:{lineno}: expected groups of {form} ({version}), got {line[:120]!r}")
        comps, key = {}, None
        for i in range(0, len(tok), width):
            ext, off, size = tok[i], tok[i + 1], tok[i + 2]
            if not (off.isdigit() and size.isdigit()):
                raise ShardError(f"{path}:{lineno}: offset and size of .{ext} must be non-negative integers, "
                                 f"got {off!r} {size!r}")
            if int(off) % TAR_BLOCK:
                raise ShardError(f"{path}:{lineno}: offset {off} of .{ext} is not a multiple of the "
                                 f"{TAR_BLOCK}-byte tar block")
            if named:
                base = split_name(tok[i + 3])[0]
                if key is not None and base != key:
                    raise ShardError(f"{path}:{lineno}: components of different samples on one line "
                                     f"({key!r} and {base!r})")
                key = base
            comps[ext] = (int(off), int(size))
        samples.append(IndexedSample(key, comps, lineno))
    if len(samples) != count:
        raise ShardError(f"{path}: header says {count} samples, the index lists {len(samples)}")
    return samples
