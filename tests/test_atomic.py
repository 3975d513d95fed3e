"""Crash-safe writes honour the umask (shared storage, containers running as another UID)."""
import os
import stat

import pytest

from echocare_dist.atomic import atomic_open, atomic_write_bytes, atomic_write_json, create_temp


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, want):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "sub" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    for p in (tmp_path / "a.bin", tmp_path / "sub" / "m.json"):
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"new, half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_create_temp_is_exclusive_and_beside_the_target(tmp_path):
    fd1, p1 = create_temp(tmp_path / "x.tar", ".partial")
    fd2, p2 = create_temp(tmp_path / "x.tar", ".partial")
    os.close(fd1), os.close(fd2)
    assert p1 != p2 and p1.parent == tmp_path and p1.name.startswith(".x.tar.") and p1.name.endswith(".partial")
