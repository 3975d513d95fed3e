"""The synthetic ultrasound generator: determinism, file types, the mapping contract, realism."""
from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import json
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from echocare_dist.config import ConfigError, load_config
from echocare_dist.curation.mapping import load_mapping
from echocare_dist.ontology import Ontology, OntologyError
from echocare_dist.synth import generate_dataset, plan_dataset


def _small_cfg(**over):
    """A quick set that still has every special case (the variants' minimum counts)."""
    base = dict(num_images=30, video_frames=6, dicom_frames=4, min_size=120, max_size=240)
    return dataclasses.replace(load_config("tiny_cpu").synth, **{**base, **over})


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def _manifest(result) -> dict:
    return json.loads(result.manifest.read_text())


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, ontology):
    cfg = _small_cfg()
    a = generate_dataset(tmp_path / "run a", cfg, ontology)
    b = generate_dataset(tmp_path / "run b", cfg, ontology)
    tree_a, tree_b = _tree(a.root), _tree(b.root)
    assert tree_a.keys() == tree_b.keys()
    different = [p for p in tree_a if tree_a[p] != tree_b[p]]
    assert not different, f"same seed, different bytes: {different[:5]}"

    c = generate_dataset(tmp_path / "run c", dataclasses.replace(cfg, seed=cfg.seed + 1), ontology)
    tree_c = _tree(c.root)
    media = [f.path for f in a.files if f.kind in ("image", "video", "dicom") and f.role == "regular"]
    same = [p for p in media if p in tree_c and tree_c[p] == tree_a[p]]
    assert len(media) > 10 and not same, f"another seed reproduced {same[:5]}"


def test_regeneration_replaces_own_folder_and_refuses_foreign_one(tmp_path, ontology):
    out = tmp_path / "set"
    generate_dataset(out, _small_cfg(num_images=40), ontology)
    before = set(_tree(out))
    result = generate_dataset(out, _small_cfg(), ontology)  # another plan: no stale file may survive
    after = set(_tree(out))
    assert before - after  # the first set had files the second does not
    assert after == {f.path for f in result.files} | {"labels.yaml", "synth_manifest.json", "README.txt",
                                                      ".echocare-synth"}
    assert json.loads((out / "synth_manifest.json").read_text())["counts"]["images"] == 30
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(foreign, _small_cfg(), ontology)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- file types
def test_counts_and_every_kind_of_file(synth_dataset, tiny_config):
    r, cfg = synth_dataset, tiny_config.synth
    assert r.images == cfg.num_images and r.videos == cfg.num_videos
    assert r.dicoms == cfg.num_dicom + cfg.num_dicom_single
    assert r.near_empty >= 3 and r.duplicates >= 3 and r.near_duplicates >= 2 and r.corrupt >= 3
    on_disk = {str(p.relative_to(r.root)) for p in r.root.rglob("*") if p.is_file()}
    assert {f.path for f in r.files} <= on_disk
    images = r.select(kind="image")
    assert {f.format for f in images} >= {"png", "jpg", "bmp"}
    assert {f.mode for f in images} >= {"L", "RGB", "I;16"}
    assert {PurePosixPath(f.path).suffix for f in r.files if f.kind == "video"} == {".mp4", ".avi"}
    assert any(" " in PurePosixPath(f.path).name for f in images)  # file names with spaces
    assert any(" " in part for f in images for part in PurePosixPath(f.path).parts[:-1])  # folders too
    assert " " in str(r.root)
    readme = (r.root / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "not real patient" in readme.lower()


def test_images_decode_with_the_declared_size_and_mode(synth_dataset, tiny_config):
    cfg = tiny_config.synth
    regular_sizes = []
    for f in synth_dataset.select(kind="image"):
        if f.role == "corrupt":
            continue
        px = _decode(synth_dataset.root / f.path)
        assert px.shape[:2] == (f.height, f.width), f.path
        expected = {"L": (2, np.uint8), "RGB": (3, np.uint8), "I;16": (2, np.uint16)}[f.mode]
        assert (px.ndim, px.dtype) == expected, f"{f.path}: {px.shape} {px.dtype}, declared {f.mode}"
        assert cfg.min_size <= min(px.shape[:2]) and max(px.shape[:2]) <= cfg.max_size, f.path
        if f.role == "regular":
            regular_sizes.append(px.shape[:2])
    assert all(h != w for h, w in regular_sizes)  # non-square
    assert len(set(regular_sizes)) > len(regular_sizes) // 2  # many sizes
    sixteen = [f for f in synth_dataset.select(kind="image", role="regular") if f.mode == "I;16"]
    assert sixteen and _decode(synth_dataset.root / sixteen[0].path).max() > 255  # real 16-bit range


def test_corrupt_files_do_not_decode(synth_dataset):
    corrupt = synth_dataset.select(role="corrupt")
    assert {f.variant for f in corrupt} == {"truncated_jpeg", "garbage_png", "truncated_png"}
    for f in corrupt:
        with pytest.raises((OSError, SyntaxError, ValueError)):
            _decode(synth_dataset.root / f.path)


def test_videos_have_the_expected_frames(synth_dataset, tiny_config):
    for f in synth_dataset.select(kind="video"):
        cap = cv2.VideoCapture(str(synth_dataset.root / f.path))
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        cap.release()
        assert len(frames) == tiny_config.synth.video_frames == f.frames, f.path
        assert frames[0].shape[:2] == (f.height, f.width)
        motion = np.abs(frames[0].astype(int) - frames[len(frames) // 2].astype(int)).mean()
        assert motion > 1.0, f"{f.path}: the clip does not move"


def test_dicom_cine_and_single_frame(synth_dataset, tiny_config):
    dicoms = synth_dataset.select(kind="dicom")
    cine = [f for f in dicoms if f.frames > 1]
    single = [f for f in dicoms if f.frames == 1]
    assert len(cine) == tiny_config.synth.num_dicom and len(single) == tiny_config.synth.num_dicom_single
    for f in cine:
        ds = pydicom.dcmread(synth_dataset.root / f.path)
        px = ds.pixel_array
        assert int(ds.NumberOfFrames) == tiny_config.synth.dicom_frames
        assert px.shape == (tiny_config.synth.dicom_frames, f.height, f.width) and px.dtype == np.uint8
        assert ds.Modality == "US" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
        assert np.abs(px[0].astype(int) - px[-1].astype(int)).mean() > 1.0
    for f in single:
        ds = pydicom.dcmread(synth_dataset.root / f.path)
        assert ds.pixel_array.shape == (f.height, f.width, 3) and ds.PhotometricInterpretation == "RGB"


def test_masks_differ_in_size_and_outline_the_hypoechoic_lesion(synth_dataset):
    masks = synth_dataset.select(kind="mask")
    assert masks and len(masks) == synth_dataset.masks
    by_path = {f.path: f for f in synth_dataset.files}
    lesions = 0
    for m in masks:
        image = by_path[m.of]
        assert not (m.path.startswith(PurePosixPath(image.path).parts[0] + "/images/"))  # sibling, not inside
        mask = _decode(synth_dataset.root / m.path)
        assert mask.shape != (image.height, image.width) and mask.shape == (m.height, m.width)
        assert set(np.unique(mask)) <= {0, 255}
        if image.scene == "breast_normal":
            assert not mask.any()
            continue
        lesions += 1
        px = _decode(synth_dataset.root / image.path).astype(np.float32)
        px = px / 257.0 if image.mode == "I;16" else px
        gray = px.mean(-1) if px.ndim == 3 else px
        full = cv2.resize(mask, (image.width, image.height), interpolation=cv2.INTER_NEAREST) > 0
        x0, y0, x1, y1 = image.sector_box
        sector = np.zeros_like(full)
        sector[y0:y1, x0:x1] = True
        assert full.sum() > 50
        assert gray[full].mean() < gray[sector & ~full & (gray > 0)].mean(), image.path  # masses and cysts are dark
    assert lesions > 0


# ----------------------------------------------------------------------------- mapping
def _labels_by_contract(entry: dict, root: Path, rel: str) -> list[str]:
    """The mapping semantics of the brief: CSV row > first matching rule (fnmatch) > source default."""
    if entry.get("csv"):
        with open(root / entry["csv"], newline="") as fh:
            rows = {r["path"]: [n for n in r["labels"].split(";") if n] for r in csv.DictReader(fh)}
        if rel in rows:
            return rows[rel]
    for rule in entry.get("rules", []):
        if fnmatch.fnmatch(rel, rule["glob"].replace("**", "*")):
            return rule["labels"]
    return entry["labels"]


def test_mapping_file_is_valid_and_reproduces_the_ground_truth(synth_dataset, ontology):
    mapping_path = synth_dataset.mapping
    assert mapping_path == synth_dataset.root / "labels.yaml"
    data = yaml.safe_load(mapping_path.read_text())
    entries = data["sources"]
    names = set()
    for e in entries:
        assert set(e) <= {"name", "root", "labels", "device", "frame_stride", "rules", "csv"}
        root = mapping_path.parent / e["root"]
        assert root.is_dir(), e["root"]
        names.update(e["labels"])
        for rule in e.get("rules", []):
            names.update(rule["labels"])
        if e.get("csv"):
            with open(root / e["csv"], newline="") as fh:
                reader = csv.DictReader(fh)
                assert reader.fieldnames == ["path", "labels"]
                for row in reader:
                    assert (root / row["path"]).is_file(), row["path"]
                    names.update(n for n in row["labels"].split(";") if n)
    assert names and names <= set(ontology.names), sorted(names - set(ontology.names))
    # every way of labelling is used
    assert any(e["labels"] == [] for e in entries)
    assert any(e.get("rules") for e in entries) and any(e.get("csv") for e in entries)
    assert any("frame_stride" in e for e in entries)
    by_name = {e["name"]: e for e in entries}
    assert any(f.labels and f.labels == by_name[f.source]["labels"] for f in synth_dataset.select(role="regular"))
    checked = 0
    for f in synth_dataset.files:
        if f.kind not in ("image", "video", "dicom"):
            continue
        e = by_name[f.source]
        root = mapping_path.parent / e["root"]
        rel = str(PurePosixPath(f.path).relative_to(e["root"]))
        assert (root / rel).is_file()
        assert _labels_by_contract(e, root, rel) == f.labels, f.path
        checked += 1
    assert checked == synth_dataset.images + synth_dataset.videos + synth_dataset.dicoms
    # region-, organ- and structure-level labels, and unlabeled files, all occur
    depths = {min(ontology.depth[ontology.node(n)] for n in f.labels) if f.labels else -1
              for f in synth_dataset.select(role="regular")}
    assert depths >= {-1, 0, 1, 2}


def test_mapping_loads_in_the_shard_builder(synth_dataset, ontology):
    sources = {s.name: s for s in load_mapping(synth_dataset.mapping, ontology)}
    for f in synth_dataset.files:
        if f.kind in ("image", "video", "dicom"):
            src = sources[f.source]
            rel = str((synth_dataset.root / f.path).resolve().relative_to(src.root).as_posix())
            assert list(src.labels_for(rel)) == f.labels, f.path


def test_unknown_ontology_node_fails_naming_it(tmp_path):
    small = Ontology.from_dict({"tree": {"head": {"thyroid": ["thyroid_nodule"]}}})
    with pytest.raises(OntologyError, match="breast_mass"):
        generate_dataset(tmp_path / "x", _small_cfg(), small)
    assert not (tmp_path / "x").exists()  # failed before writing anything


def test_too_small_num_images_is_a_config_error():
    with pytest.raises(ConfigError, match="synth.num_images=8"):
        plan_dataset(_small_cfg(num_images=8))
    plain = _small_cfg(num_images=8, near_empty_fraction=0.0, duplicate_fraction=0.0,
                       near_duplicate_fraction=0.0, corrupt_fraction=0.0)
    assert sum(f.kind == "image" for f in plan_dataset(plain)) == 8


# ----------------------------------------------------------------------------- realism & curation cases
def test_images_look_like_ultrasound(synth_dataset):
    """Dark background around the sector, bright burned-in text in the border, speckle inside."""
    checked = 0
    for f in synth_dataset.select(kind="image", role="regular"):
        px = _decode(synth_dataset.root / f.path).astype(np.float32)
        px = px / 257.0 if f.mode == "I;16" else px
        gray = px.max(-1) if px.ndim == 3 else px
        x0, y0, x1, y1 = f.sector_box
        border = np.ones(gray.shape, bool)
        border[y0:y1, x0:x1] = False
        assert (gray[border] < 13).mean() > 0.75, f"{f.path}: border not dark"
        assert (gray[border] > 180).sum() > 30, f"{f.path}: no burned-in text"
        sector = gray[y0:y1, x0:x1]
        assert np.count_nonzero(sector) > 1000
        assert 15 < sector[sector > 0].mean() < 200, f"{f.path}: sector brightness {sector[sector > 0].mean()}"
        # Fully developed speckle: in echogenic tissue (not fluid, not outside the fan), strong
        # pixel-to-pixel fluctuation around the local mean.
        local = cv2.blur(sector, (9, 9))
        inside = cv2.erode((sector > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        tissue = inside & (local > 40)
        assert tissue.sum() > 500, f"{f.path}: hardly any echogenic tissue"
        assert np.abs(sector - local)[tissue].mean() > 6, f"{f.path}: no speckle"
        checked += 1
    assert checked == len(synth_dataset.select(kind="image", role="regular"))


def test_near_empty_duplicates_and_near_duplicates(synth_dataset):
    root = synth_dataset.root
    for f in synth_dataset.select(role="near_empty"):
        assert np.count_nonzero(_decode(root / f.path)) < 1000, f.path
    by_path = {f.path: f for f in synth_dataset.files}
    variants = set()
    for f in synth_dataset.select(role="duplicate"):
        variants.add(f.variant)
        a, b = _decode(root / f.path), _decode(root / f.of)
        assert np.array_equal(a, b), f"{f.path} is not a pixel duplicate of {f.of}"
        same_bytes = (root / f.path).read_bytes() == (root / f.of).read_bytes()
        assert same_bytes == (f.variant == "byte_copy")
        assert by_path[f.of].role == "regular"
    assert variants == {"byte_copy", "png_resave", "bmp_export"}
    for f in synth_dataset.select(role="near_duplicate"):
        a, b = _decode(root / f.path).astype(int), _decode(root / f.of).astype(int)
        assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 4
    # no accidental exact duplicates among the regular images
    hashes = [hashlib.sha256(_decode(root / f.path).tobytes()).hexdigest()
              for f in synth_dataset.select(kind="image", role="regular")]
    assert len(hashes) == len(set(hashes))


def test_cli_writes_dataset_and_resolved_config(tmp_path):
    from echocare_dist.cli import main
    out = tmp_path / "cli out"
    args = ["synth", "--config", "tiny_cpu", "--out", str(out), "--set", "synth.num_images=30",
            "--set", "synth.video_frames=4", "--set", "synth.dicom_frames=3", "--set", "synth.max_size=200"]
    assert main(args) == 0
    assert (out / "labels.yaml").is_file() and (out / "config.resolved.yaml").is_file()
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["synth"]["num_images"] == 30
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.png").write_bytes(b"x")
    assert main(args[:4] + [str(foreign)]) == 2
    assert main(["synth", "--out", str(tmp_path / "y"), "--set", "synth.min_size=10"]) == 2
