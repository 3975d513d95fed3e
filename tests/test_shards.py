"""Shard builder end to end: rejections, determinism, verify, resume and crash safety, the CLI
(units and label mappings: test_shards_units.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from echocare_dist.curation import build_shards, verify_shards
from echocare_dist.curation import builder as builder_mod
from echocare_dist.synth.patterns import sector_frame
from test_shards_data import OVERRIDES, curation_config, make_dataset

REPO = Path(__file__).resolve().parent.parent


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every shard, index and the manifest: what 'identical build' means."""
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("shard-") or p.name == "manifest.json")
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def read_samples(shard_dir: Path) -> dict[str, dict]:
    """key -> {jpg, lbl, json} read with tarfile (independent of our index code)."""
    out: dict[str, dict] = {}
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory, ontology):
    """The fixture sources built with 2 worker processes."""
    out = tmp_path_factory.mktemp("shards")
    manifest = build_shards([dataset.mapping], out, curation_config(workers=2), ontology, progress=False)
    return out, manifest


# ------------------------------------------------------------------------------------ the build
def test_build_counts_rejections_and_format(built, dataset, ontology):
    out, m = built
    exp = dataset.expect
    assert m.num_samples == exp["samples"] == sum(s.samples for s in m.shards)
    assert m.per_source == exp["per_source"]
    assert m.ontology_hash == ontology.hash and m.ontology_nodes == len(ontology)
    rej = m.rejected
    for reason in ("corrupt", "too_few_pixels", "duplicate"):
        assert set(rej[reason]["paths"]) == exp[reason], reason
        assert rej[reason]["count"] == len(exp[reason])
    assert rej["near_duplicate"]["count"] == 0
    assert all(d["error"] for d in rej["corrupt"]["details"])
    assert "truncated" in next(d["error"] for d in rej["corrupt"]["details"] if d["path"].endswith("broken.jpg"))
    assert rej["duplicate"]["details"][0]["of"]["path"] == exp["duplicate_of"]
    assert m.ignored["count"] == 2  # notes.txt, labels.csv (hidden .DS_Store is not even listed)
    assert all(s.samples <= 8 for s in m.shards) and len(m.shards) == -(-exp["samples"] // 8)
    assert (out / "config.resolved.yaml").is_file() and not (out / ".staging").exists()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json", "config.resolved.yaml"]
                           + [s.name for s in m.shards] + [s.name[:-4] + ".idx" for s in m.shards])


def test_samples_labels_frames_and_jpegs(built, dataset, ontology):
    out, m = built
    samples = read_samples(out)
    assert len(samples) == m.num_samples
    frames: dict[str, list] = {}
    for key, s in samples.items():
        assert set(s) == {"jpg", "lbl", "json"} and len(key) == 16 and int(key, 16) >= 0
        prov = json.loads(s["json"])
        img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 2 and (img.shape[1], img.shape[0]) == (prov["width"], prov["height"])
        assert s["jpg"][:2] == b"\xff\xd8" and b"\xff\xc0" in s["jpg"]  # baseline (SOF0) JPEG
        lbl = np.frombuffer(s["lbl"], np.int8)
        np.testing.assert_array_equal(lbl, ontology.label_vector(prov["labels"]))
        path = prov["path"]
        want = {"scans day 1/img 0.png": ["thyroid_lobe", "thyroid_isthmus"], "scan bmp.bmp": [],
                "apical 4ch.mp4": ["left_ventricle"], "cine loop.dcm": ["heart"], "IM0001": ["heart"]}
        if path.startswith("nodules/"):
            assert prov["labels"] == ["thyroid_nodule"]
        elif path in want:
            assert prov["labels"] == want[path], path
        elif prov["source"] == "Thyroid US":
            assert prov["labels"] == ["thyroid"], path
        if path == "scan bmp.bmp":
            assert (lbl == -1).all()  # unlabeled: every node ignored
        frames.setdefault(path, []).append(prov["frame"])
        assert prov["ontology_hash"] == ontology.hash
        assert prov["device"] == ("synthetic linear" if prov["source"] == "Thyroid US" else None)
        # the crop removed the border: the stored image is smaller than the frame
        assert prov["width"] < prov["orig_width"] and prov["height"] < prov["orig_height"]
    assert sorted(frames["apical 4ch.mp4"]) == dataset.expect["mp4_frames"]
    assert sorted(frames["cine loop.dcm"]) == dataset.expect["dicom_frames"]
    assert frames["IM0001"] == [None] and frames["deep 16bit.png"] == [None]
    per_node = np.sum([np.frombuffer(s["lbl"], np.int8) == 1 for s in samples.values()], axis=0)
    assert m.per_node == {n: int(v) for n, v in zip(ontology.names, per_node)}


def test_shards_are_globally_shuffled(built):
    out, m = built
    # Shuffled across shards: the first shard mixes both sources, not just the first source's files.
    first = [json.loads(s["json"])["source"] for s in read_samples_first(out / m.shards[0].name)]
    assert len(set(first)) == 2


def test_seed_changes_the_order_not_the_content(built, dataset, tmp_path, ontology):
    out, m = built
    other = build_shards([dataset.mapping], tmp_path / "s1", curation_config(workers=1, seed=1), ontology,
                         progress=False)
    def order(folder: Path) -> list[str]:
        names = []
        for tar in sorted(folder.glob("shard-*.tar")):
            with tarfile.open(tar) as tf:
                names += tf.getnames()
        return names

    assert order(tmp_path / "s1") != order(out)
    assert sorted(order(tmp_path / "s1")) == sorted(order(out))
    assert other.per_node == m.per_node and other.rejected == m.rejected


def test_shard_byte_limit(dataset, tmp_path, ontology):
    limit = 64 * 1024
    m = build_shards([dataset.mapping], tmp_path / "b", curation_config(workers=1, shard_max_bytes=limit,
                                                                         shard_max_samples=1000),
                     ontology, progress=False)
    assert len(m.shards) > 2 and m.num_samples == 22
    for s in m.shards:
        assert s.bytes == (tmp_path / "b" / s.name).stat().st_size
        assert s.bytes <= limit or s.samples == 1
    # Greedy: a shard was only closed because the next sample would not fit.
    assert sum(s.bytes for s in m.shards[:-1]) > 0.6 * limit * (len(m.shards) - 1)


def read_samples_first(tar: Path) -> list[dict]:
    with tarfile.open(tar) as tf:
        return [{"json": tf.extractfile(x).read()} for x in tf if x.name.endswith(".json")]


def test_index_matches_wds2idx_byte_for_byte(built, tmp_path):
    out, m = built
    for s in m.shards:
        ref = tmp_path / (s.name + ".ref.idx")
        subprocess.run([str(REPO / ".venv" / "bin" / "wds2idx"), str(out / s.name), str(ref)],
                       check=True, capture_output=True)
        assert (out / s.name).with_suffix(".idx").read_bytes() == ref.read_bytes()


def test_workers_do_not_change_the_result(built, dataset, tmp_path, ontology):
    out, _ = built
    build_shards([dataset.mapping], tmp_path / "w1", curation_config(workers=1), ontology, progress=False)
    assert tree_digest(tmp_path / "w1") == tree_digest(out)


def test_near_dedup_drops_perceptual_duplicates(tmp_path, ontology):
    root = tmp_path / "near"
    root.mkdir()
    a, _ = sector_frame(240, 320, seed=1)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    b, _ = sector_frame(240, 320, seed=2)
    for name, img in (("a.png", a), ("a noisy.png", noisy), ("b.png", b)):
        cv2.imwrite(str(root / name), img)
    mapping = tmp_path / "m.yaml"
    mapping.write_text("sources:\n  - {name: n, root: near, labels: [liver]}\n")
    plain = build_shards([mapping], tmp_path / "plain", curation_config(workers=1, near_dedup="false"), ontology,
                         progress=False)
    assert plain.num_samples == 3  # pixels differ: no exact duplicate
    m = build_shards([mapping], tmp_path / "nd", curation_config(workers=1), ontology, progress=False)  # the default
    nd = m.rejected["near_duplicate"]
    assert m.num_samples == 2 and nd["count"] == 1
    assert nd["paths"] == [str((root / "a.png").resolve())]  # "a noisy.png" sorts first and is kept
    assert nd["details"][0]["of"]["path"] == str((root / "a noisy.png").resolve())


# ------------------------------------------------------------------------------------ verify
def test_verify_passes_and_catches_tampering(built, tmp_path, ontology):
    out, m = built
    assert verify_shards(out, ontology).ok
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tar = bad / m.shards[1].name
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        jpg = next(x for x in tf if x.name.endswith(".jpg"))
    data[jpg.offset_data + 2: jpg.offset_data + 200] = b"\0" * 198  # wreck the JPEG headers
    tar.write_bytes(bytes(data))
    (bad / m.shards[2].name).with_suffix(".idx").unlink()
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["per_source"]["Thyroid US"] += 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shards(bad, ontology)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{tar.name}: sha256 differs" in text
    assert "does not decode" in text or "not 8-bit grayscale" in text
    assert "index shard-000002.idx missing" in text
    assert "per_source counts" in text
    # Wrong ontology: caught by hash before anything else.
    from echocare_dist.ontology import Ontology
    other = Ontology.from_dict({"tree": {"a": ["b"]}})
    assert any("ontology" in p for p in verify_shards(out, other).problems)


# ------------------------------------------------------------------------------------ resume
def test_rerun_is_a_no_op(built, dataset, ontology):
    out, m = built
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_shards([dataset.mapping], out, curation_config(workers=2), ontology, progress=False)
    assert again == m
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_exception_mid_write_then_resume_is_identical(built, dataset, tmp_path, ontology, monkeypatch):
    out, _ = built
    target = tmp_path / "crash"
    real = builder_mod.write_shard
    calls = {"n": 0}

    def failing(path, members, plan, reader):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected crash while writing the third shard")
        return real(path, members, plan, reader)

    monkeypatch.setattr(builder_mod, "write_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        build_shards([dataset.mapping], target, curation_config(workers=1), ontology, progress=False)
    # Not complete-looking: no manifest, no third tar, no temporary left over.
    assert not (target / "manifest.json").exists()
    assert sorted(p.name for p in target.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not [p for p in target.iterdir() if p.name.startswith(".shard-")]
    assert not verify_shards(target, ontology).ok
    done = {p.name: p.stat().st_mtime_ns for p in target.glob("shard-*")}

    monkeypatch.setattr(builder_mod, "write_shard", real)
    def no_restaging(task):
        raise AssertionError(f"chunk {task.index} was staged again instead of reused")

    monkeypatch.setattr(builder_mod, "stage_chunk", no_restaging)
    build_shards([dataset.mapping], target, curation_config(workers=1), ontology, progress=False)
    assert tree_digest(target) == tree_digest(out)
    assert {n: (target / n).stat().st_mtime_ns for n in done} == done  # finished shards not rewritten


@pytest.mark.slow
def test_sigkill_mid_shard_then_resume_is_identical(built, dataset, tmp_path):
    """A hard kill while a tar is half written: the rerun cleans up and matches a clean build."""
    out, _ = built
    target = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from echocare_dist.config import load_config
        from echocare_dist.ontology import load_ontology
        from echocare_dist.curation import build_shards
        from echocare_dist.shardfmt import ShardWriter
        real_write, n = ShardWriter.write, [0]
        def write(self, key, comps):
            n[0] += 1
            real_write(self, key, comps)
            if n[0] == 13:  # inside the second shard (8 samples per shard)
                self._tar.fileobj.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        ShardWriter.write = write
        if __name__ == "__main__":
            cfg = load_config("tiny_cpu", {OVERRIDES!r} + ["curation.workers=2"])
            build_shards([Path({str(dataset.mapping)!r})], Path({str(target)!r}), cfg,
                         load_ontology({str(REPO / "configs/ontology/default.yaml")!r}), progress=False)
        """)
    (tmp_path / "kill.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    partial = [p.name for p in target.iterdir() if p.name.endswith(".partial")]
    assert partial and not (target / "manifest.json").exists()
    assert not (target / "shard-000001.tar").exists()
    cli = [sys.executable, "-m", "echocare_dist.cli", "shards", "build", "--config", "tiny_cpu",
           "--mapping", str(dataset.mapping), "--out", str(target), "--no-progress",
           *[a for o in OVERRIDES for a in ("--set", o)]]
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "22 samples" in done.stdout
    assert tree_digest(target) == tree_digest(out)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ CLI
def test_cli_verify_inspect_and_bad_mapping(built, tmp_path):
    out, m = built
    run = lambda *a: subprocess.run([sys.executable, "-m", "echocare_dist.cli", "shards", *a],  # noqa: E731
                                    cwd=REPO, capture_output=True, text=True)
    v = run("verify", str(out), "--config", "tiny_cpu")
    assert v.returncode == 0 and "OK (22 samples" in v.stdout, v.stderr
    sheet = tmp_path / "sheet.png"
    i = run("inspect", str(out), "--config", "tiny_cpu", "--num", "9", "--out", str(sheet))
    assert i.returncode == 0, i.stderr
    assert "22 samples" in i.stdout and "duplicate 2" in i.stdout and "corrupt 4" in i.stdout
    from PIL import Image
    with Image.open(sheet) as im:
        assert im.size == (3 * 192, 3 * (192 + 56))  # captions: key, source: path (2 lines), labels
        assert np.asarray(im).std() > 10  # not a blank canvas
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"sources:\n  - {{name: x, root: {str(out)!r}, labels: [kidnee]}}\n")
    b = run("build", "--config", "tiny_cpu", "--mapping", str(bad), "--out", str(tmp_path / "o"))
    assert b.returncode == 2 and "'kidnee'" in b.stderr and str(bad) in b.stderr
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / m.shards[0].name).write_bytes(b"truncated")
    v = run("verify", str(broken))
    assert v.returncode == 1 and "shard-000000.tar" in v.stderr


def test_external_staging_dir_is_cleaned_but_kept_and_builds_are_exclusive(dataset, built, tmp_path, ontology):
    out, _ = built
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "someone else's file").write_text("keep me")
    target = tmp_path / "ext"
    build_shards([dataset.mapping], target, curation_config(workers=1, staging_dir=str(scratch)), ontology,
                 progress=False)
    assert tree_digest(target) == tree_digest(out)
    assert sorted(p.name for p in scratch.iterdir()) == ["someone else's file"]
    with builder_mod._exclusive(target.resolve()):
        with pytest.raises(builder_mod.CurationError, match="another"):
            build_shards([dataset.mapping], target, curation_config(workers=1), ontology, progress=False)
