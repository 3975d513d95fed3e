"""Fault injection, data side (issue 11, items 5 and 7): damaged shards, indexes and samples, hostile
source files, concurrent builds. Each test injects one fault and asserts that it ends cleanly: a
finding or a recorded rejection, a rebuild, or a one-line error; never a traceback, never silence.
The checkpoint, export and security triggers are in test_faults_checkpoint.py. `-m fault` runs
them all and ends with the fault table (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_fixtures import loader_config, take, write_shards
from echocare_dist.config import load_config
from echocare_dist.curation import CurationError, build_shards, verify_shards
from echocare_dist.curation.deid import default_map_path, originals
from echocare_dist.curation.outdir import LOCK_NAME, build_lock
from echocare_dist.curation.report import format_summary
from echocare_dist.data import build_loader
from echocare_dist.data.shards import ShardIndex
from echocare_dist.shardfmt import CHECKSUM_KEY, Manifest, jpg_checksum
from echocare_dist.synth.patterns import sector_frame

pytestmark = pytest.mark.fault
OVERRIDES = ["curation.shard_max_samples=3", "curation.chunk_files=4", "curation.workers=1"]


def curation_config(*extra: str):
    return load_config("tiny_cpu", OVERRIDES + list(extra))


def _write_avi(path: Path, frames: int, seed: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (160, 120), isColor=False)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(sector_frame(120, 160, seed=seed + i)[0])
    writer.release()


def make_sources(root: Path) -> Path:
    """Eight distinct sector images, an intact 30-frame avi and one cut halfway; a mapping file."""
    images = root / "scans"
    images.mkdir(parents=True)
    for i in range(8):
        cv2.imwrite(str(images / f"scan {i}.png"), sector_frame(150 + 4 * i, 200, seed=i)[0])
    _write_avi(images / "loop intact.avi", 30, seed=100)
    cut = images / "loop cut.avi"
    _write_avi(cut, 30, seed=200)
    with open(cut, "r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)
    mapping = root / "labels.yaml"
    mapping.write_text(f"sources:\n  - {{name: clinic, root: {str(images)!r}, labels: [kidney]}}\n")
    return mapping


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return make_sources(tmp_path_factory.mktemp("fault sources"))


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory, ontology):
    out = tmp_path_factory.mktemp("fault shards")
    return out, build_shards([sources], out, curation_config(), ontology, progress=False)


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def _copy(built, dst: Path) -> Path:
    shutil.copytree(built[0], dst)
    # A de-identified set moves with its path map (its salt): the rebuild then keeps every key.
    shutil.copy2(default_map_path(built[0]), default_map_path(dst))
    return dst


# ------------------------------------------------------------------ item 5: damaged indexes
def _damage_index(idx: Path, how: str) -> None:
    lines = idx.read_text().splitlines()
    tok = lines[1].split()
    if how == "offset_zero":
        tok[1] = "0"
    elif how == "past_end":
        tok[1] = str(512 * 10**6)
    elif how == "into_data":      # a block-aligned offset inside a member's data: no header before it
        tok[1] = str(int(tok[1]) + 1024)
    elif how == "wrong_count":
        lines[0] = f"v1.2 {len(lines) + 5}"
    elif how == "v1_1":           # the older format, without member names: no key to check anything by
        lines = [lines[0].replace("v1.2", "v1.1")] + [
            " ".join(" ".join(t[i:i + 3]) for i in range(0, len(t), 4)) for t in (line.split() for line in lines[1:])]
        idx.write_text("\n".join(lines) + "\n")
        return
    if how == "garbage":
        idx.write_bytes(os.urandom(300))
        return
    if how != "wrong_count":
        lines[1] = " ".join(tok)
    idx.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how", ["offset_zero", "past_end", "into_data", "garbage", "wrong_count", "v1_1"])
def test_verify_reports_a_damaged_index_as_a_finding(tmp_path, ontology, how):
    root = tmp_path / "shards"
    write_shards(root, ontology, counts=(4, 4), size=(64, 48), distinct_images=2)
    if how == "into_data":  # needs a .jpg of more than 1024 bytes
        assert ShardIndex.read(root / "shard-000000.idx").jpg[0, 1] > 1024
    _damage_index(root / "shard-000000.idx", how)
    report = verify_shards(root, ontology)   # must not raise
    assert not report.ok
    assert any("shard-000000" in p for p in report.problems), report.problems
    assert not any("shard-000001" in p for p in report.problems), report.problems


# ------------------------------------------------------------------ item 5: rerun over damage
def test_rerun_rebuilds_a_damaged_index(built, sources, tmp_path, ontology):
    out, manifest = built
    target = _copy(built, tmp_path / "copy")
    idx = target / "shard-000001.idx"
    text = idx.read_text()
    swapped = text.replace("jpg", "jpX", 1)   # same size, wrong content: DALI would read garbage
    assert len(swapped) == len(text) and swapped != text
    idx.write_text(swapped)
    again = build_shards([sources], target, curation_config(), ontology, progress=False)
    assert _digests(target) == _digests(out)
    assert again.num_samples == manifest.num_samples
    assert verify_shards(target, ontology).ok


def test_rerun_rebuilds_a_truncated_tar_and_keeps_intact_shards(built, sources, tmp_path, ontology):
    out, _ = built
    target = _copy(built, tmp_path / "copy")
    tar = target / "shard-000002.tar"
    with open(tar, "r+b") as fh:
        fh.truncate(tar.stat().st_size // 2)
    intact = target / "shard-000000.tar"
    before = intact.stat().st_mtime_ns
    build_shards([sources], target, curation_config(), ontology, progress=False)
    assert _digests(target) == _digests(out)
    assert intact.stat().st_mtime_ns == before  # only the damaged shard was rewritten


def test_rerun_with_verify_finds_same_size_damage(built, sources, tmp_path, ontology):
    out, _ = built
    target = _copy(built, tmp_path / "copy")
    tar = target / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    start = ShardIndex.read(target / "shard-000001.idx").jpg[0, 0]
    data[start + 300] ^= 0xFF
    tar.write_bytes(bytes(data))
    build_shards([sources], target, curation_config(), ontology, progress=False)
    assert tar.read_bytes() == bytes(data)  # sizes match: without --verify the tar is not read in full
    build_shards([sources], target, curation_config(), ontology, progress=False, verify=True)
    assert _digests(target) == _digests(out)


# ------------------------------------------------------------------ item 5: per-sample checksum
def test_flipped_jpeg_bytes_are_caught_by_the_sample_checksum(tmp_path, ontology):
    root = tmp_path / "shards"
    write_shards(root, ontology, counts=(6, 6), size=(96, 72), flipped_jpeg=(1, 2))
    idx = ShardIndex.read(root / "shard-000001.idx")
    bad_key = idx.keys[2]
    with open(root / "shard-000001.tar", "rb") as fh:
        fh.seek(int(idx.jpg[2, 0]))
        jpg = fh.read(int(idx.jpg[2, 1]))
    assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE) is not None  # still decodes
    report = verify_shards(root, ontology)
    assert [p for p in report.problems if CHECKSUM_KEY in p and bad_key in p], report.problems

    run_dir = tmp_path / "run"
    cfg = loader_config(root, "pil", "data.verify_samples=true", "data.num_threads=0")
    loader = build_loader(cfg, ontology, rank=0, world_size=1, device="cpu", run_dir=run_dir)
    keys = [k for b in take(loader, loader.steps_per_epoch) for k in b["keys"]]
    loader.close()
    assert bad_key not in keys and loader.bad_samples == 1
    record = json.loads((run_dir / "quarantine.json").read_text())
    assert CHECKSUM_KEY in record["samples"][f"shard-000001.tar/{bad_key}"]["reason"]


def test_builder_writes_the_checksum_of_every_sample(built):
    out, manifest = built
    from echocare_dist.shardfmt import ShardReader
    for entry in manifest.shards:
        with ShardReader(out / entry.name) as reader:
            for i in range(len(reader)):
                sample = reader.read(i)
                assert json.loads(sample["json"])[CHECKSUM_KEY] == jpg_checksum(sample["jpg"])


# ------------------------------------------------------------------ item 5: truncated video
def test_truncated_video_is_recorded_with_its_frames_kept(built):
    out, manifest = built
    truncated = manifest.rejected["truncated_video"]
    original = originals(out)  # de-identified by default: ids, the path map names the files
    assert truncated["count"] == 1 and original[truncated["paths"][0]].endswith("loop cut.avi")
    assert "frames its header states" in truncated["details"][0]["detail"]
    frames = {}
    from echocare_dist.shardfmt import ShardReader
    for entry in manifest.shards:
        with ShardReader(out / entry.name) as reader:
            for i in range(len(reader)):
                prov = json.loads(reader.read(i)["json"])
                frames.setdefault(Path(original[prov["path"]]).name, []).append(prov["frame"])
    assert sorted(frames["loop intact.avi"]) == [0, 10, 20]
    assert 0 in frames["loop cut.avi"]  # what could be read is kept


# ------------------------------------------------------------------ item 7: hostile source files
def test_pixel_cap_rejects_from_the_header_before_decoding(tmp_path, ontology, monkeypatch):
    images = tmp_path / "big"
    images.mkdir()
    cv2.imwrite(str(images / "huge.png"), np.zeros((12000, 12000), np.uint8))  # 144 Mpx, compresses to ~140 kB
    cv2.imwrite(str(images / "fine.png"), sector_frame(150, 200, seed=1)[0])
    mapping = tmp_path / "m.yaml"
    mapping.write_text(f"sources:\n  - {{name: big, root: {str(images)!r}, labels: [kidney]}}\n")
    from PIL import Image
    real_load = Image.Image.load

    def guarded_load(im):
        assert im.size[0] * im.size[1] <= 64_000_000, "a frame over curation.max_pixels was decoded"
        return real_load(im)

    monkeypatch.setattr(Image.Image, "load", guarded_load)
    t0 = time.monotonic()
    manifest = build_shards([mapping], tmp_path / "out", curation_config(), ontology, progress=False)
    assert time.monotonic() - t0 < 30  # the decode alone took 46 s (and 5.7 GB) before the cap
    assert manifest.rejected["too_large"]["count"] == 1
    assert "12000x12000" in manifest.rejected["too_large"]["details"][0]["detail"]
    assert manifest.num_samples == 1
    small = build_shards([mapping], tmp_path / "out2", curation_config("curation.max_pixels=10000"), ontology,
                         progress=False)
    assert small.rejected["too_large"]["count"] == 2 and small.num_samples == 0


def test_non_utf8_file_name_is_printed_safely(tmp_path, ontology, capsys):
    images = tmp_path / "src"
    images.mkdir()
    cv2.imwrite(str(images / "ok.png"), sector_frame(150, 200, seed=3)[0])
    bad_name = os.fsdecode(b"scan \xff\xfe.png")
    Path(images, bad_name).write_bytes(b"not an image at all")   # rejected as corrupt: listed by name
    mapping = tmp_path / "m.yaml"
    mapping.write_text(f"sources:\n  - {{name: s, root: {str(images)!r}, labels: [kidney]}}\n")
    from echocare_dist.cli import main
    rc = main(["shards", "build", "--config", "tiny_cpu", "--mapping", str(mapping), "--out", str(tmp_path / "o"),
               "--no-progress", "--set", "curation.deid=false"])  # de-identified, no name is printed at all
    out = capsys.readouterr().out
    assert rc == 0
    assert "scan \\xff\\xfe.png" in out
    text = format_summary(Manifest.read(tmp_path / "o"))
    text.encode("utf-8")  # no surrogate left: prints on any UTF-8 terminal
    assert "scan \\xff\\xfe.png" in text


def test_concurrent_build_is_refused_with_one_line(sources, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    from echocare_dist.cli import main
    with build_lock(out):
        holder = (out / LOCK_NAME).read_text()
        assert f"pid {os.getpid()}" in holder
        rc = main(["shards", "build", "--config", "tiny_cpu", "--mapping", str(sources), "--out", str(out),
                   "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"pid {os.getpid()}" in err and "another `shards build`" in err
    assert not (out / LOCK_NAME).exists()  # released with its holder


def test_lock_left_by_a_dead_build_does_not_block(sources, tmp_path, ontology):
    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK_NAME).write_text("host elsewhere pid 999999 since 2026-01-01T00:00:00Z\n")  # no one holds it
    manifest = build_shards([sources], out, curation_config(), ontology, progress=False)
    assert manifest.num_samples > 0
    with build_lock(out):
        with pytest.raises(CurationError, match=f"pid {os.getpid()}"):
            with build_lock(out):
                pass
