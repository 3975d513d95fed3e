"""Shards read back by the two loaders' libraries: DALI's webdataset reader (CPU) and webdataset."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from echocare_dist.config import load_config
from echocare_dist.curation import build_shards, verify_shards
from echocare_dist.curation.deid import originals
from echocare_dist.shardfmt import Manifest
from test_shards_data import make_dataset


def reference(shard_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    """(key, decoded image, label vector, provenance) in tar order, via tarfile + cv2."""
    out = []
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            parts: dict[str, dict] = {}
            for m in tf:
                key, ext = m.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, p in parts.items():
            img = cv2.imdecode(np.frombuffer(p["jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
            out.append((key, img, np.frombuffer(p["lbl"], np.int8), json.loads(p["json"])))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ontology):
    base = tmp_path_factory.mktemp("readback")
    ds = make_dataset(base / "src")
    cfg = load_config("tiny_cpu", ["curation.shard_max_samples=8", "curation.workers=1"])
    build_shards([ds.mapping], base / "shards", cfg, ontology, progress=False)
    return base / "shards"


def read_with_dali(shard_dir: Path, shard_id: int = 0, num_shards: int = 1):
    """[(gray image, int8 label vector, provenance dict)] read by fn.readers.webdataset on the CPU."""
    from nvidia.dali import fn, pipeline_def, types
    tars = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    idxs = [t[:-4] + ".idx" for t in tars]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        # The label bytes must be *reinterpreted* as int8 (dtypes), not cast: a cast would saturate
        # the byte 0xff (-1, ignore) to 127. The variable-length JSON is padded to batch it.
        jpg, lbl, prov = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "lbl", "json"],
            dtypes=[types.UINT8, types.INT8, types.UINT8], missing_component_behavior="error",
            random_shuffle=False, shard_id=shard_id, num_shards=num_shards, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.GRAY), lbl, fn.pad(prov, fill_value=0)

    p = pipe()
    p.build()
    size = p.reader_meta("reader")["epoch_size"]
    size = size // num_shards + (shard_id < size % num_shards)
    out = []
    while len(out) < size:
        img, lbl, prov = p.run()
        for i in range(len(lbl)):
            raw = np.array(prov[i]).tobytes().rstrip(b"\0")
            out.append((np.array(img[i])[:, :, 0], np.array(lbl[i]), json.loads(raw)))
    return out[:size]


def test_dali_reads_every_sample_with_labels(shards, ontology):
    ref = reference(shards)
    got = read_with_dali(shards)
    assert len(got) == len(ref) > 0
    for (key, img, lbl, prov), (got_img, got_lbl, got_prov) in zip(ref, got):
        assert got_prov == prov
        assert got_lbl.dtype == np.int8 and got_lbl.shape == (len(ontology),)
        np.testing.assert_array_equal(got_lbl, lbl)
        np.testing.assert_array_equal(got_lbl, ontology.label_vector(prov["labels"]))
        assert got_img.shape == img.shape == (prov["height"], prov["width"])
        assert np.abs(got_img.astype(int) - img.astype(int)).mean() < 1.0
    assert any((lb == -1).all() for _, lb, _ in got)  # the unlabeled sample kept its ignore bytes


def test_dali_sharding_is_disjoint_and_complete(shards):
    ids = lambda samples: [(p["source"], p["path"], p["frame"]) for *_, p in samples]  # noqa: E731
    want = ids(reference(shards))
    got = ids(read_with_dali(shards, 0, 2)) + ids(read_with_dali(shards, 1, 2))
    assert len(set(want)) == len(want)
    assert sorted(got, key=str) == sorted(want, key=str)


def test_webdataset_reads_every_sample_with_labels(shards, ontology, monkeypatch):
    import webdataset as wds
    ref = {key: (img, lbl, prov) for key, img, lbl, prov in reference(shards)}
    urls = sorted(str(p) for p in shards.glob("shard-*.tar"))
    seen: dict[str, int] = {}
    for rank in range(2):  # two simulated ranks: split_by_node must give disjoint, complete coverage
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = (wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=False, empty_check=False)
              .decode("l8").to_tuple("__key__", "jpg", "lbl", "json"))
        for key, img, lbl, prov in ds:
            assert key not in seen
            seen[key] = rank
            want_img, want_lbl, want_prov = ref[key]
            got_lbl = np.frombuffer(lbl, np.int8)
            np.testing.assert_array_equal(got_lbl, want_lbl)
            np.testing.assert_array_equal(got_lbl, ontology.label_vector(prov["labels"]))
            assert prov == want_prov and img.shape == want_img.shape
    assert set(seen) == set(ref) and set(seen.values()) == {0, 1}


def test_synthetic_dataset_shards(request, ontology):
    """The shared `tiny_shards` fixture (synthetic generator -> builder) verifies and reads back."""
    tiny = request.getfixturevalue("tiny_shards")
    report = verify_shards(tiny, ontology)
    assert report.ok, report.summary()
    manifest = Manifest.read(tiny)
    assert report.num_samples == manifest.num_samples > 0
    assert sum(manifest.per_node.values()) > 0
    assert len(read_with_dali(tiny)) == manifest.num_samples


def test_synthetic_rejections_and_crops_match_ground_truth(request):
    """Against the generator's ground truth: rejection counts, and every crop stays inside the
    imaged sector (no text, logo or grey-scale bar ever widens it) while covering most of it."""
    synth = request.getfixturevalue("synth_dataset")
    tiny = request.getfixturevalue("tiny_shards")
    manifest = Manifest.read(tiny)
    rej = manifest.rejected
    assert rej["corrupt"]["count"] == synth.corrupt
    assert rej["too_few_pixels"]["count"] == synth.near_empty
    assert rej["duplicate"]["count"] == synth.duplicates
    original = originals(tiny)  # de-identified (the default): the restricted map leads back
    truth = {(Path(synth.root) / f.path).resolve(): f for f in synth.files}
    margin = manifest.curation["crop_margin"]
    ious = []
    for _, _, _, prov in reference(tiny):
        f = truth[Path(original[prov["path"]]).resolve()]
        if f.kind != "image" or f.role != "regular" or not f.sector_box:
            continue
        (x0, y0, x1, y1), (a0, b0, a1, b1) = prov["crop"], f.sector_box
        assert a0 - margin - 2 <= x0 and b0 - margin - 2 <= y0, (f.path, prov["crop"], f.sector_box)
        assert x1 <= a1 + margin + 2 and y1 <= b1 + margin + 2, (f.path, prov["crop"], f.sector_box)
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        ious.append(inter / ((x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter))
    assert len(ious) > 50
    # Most sectors are bright to their rim; dark-field ones (fetal fluid, B-lines) crop tighter.
    assert np.median(ious) > 0.9


def test_synthetic_near_duplicates_are_found(request, tmp_path, ontology):
    synth = request.getfixturevalue("synth_dataset")
    cfg = load_config("tiny_cpu", ["curation.near_dedup=true", "curation.workers=1"])
    m = build_shards([synth.mapping], tmp_path / "nd", cfg, ontology, progress=False)
    original = originals(tmp_path / "nd")
    pairs = {frozenset((original[d["path"]], original[d["of"]["path"]]))
             for d in m.rejected["near_duplicate"]["details"]}
    planted = [f for f in synth.files if f.role == "near_duplicate"]
    assert planted
    for f in planted:
        pair = frozenset(str((Path(synth.root) / p).resolve()) for p in (f.path, f.of))
        assert pair in pairs, f.path
