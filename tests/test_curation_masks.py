"""Masks kept out of shards (by name and by content), `exclude:` globs, `allow_mask_like`, and
duplicate groups with conflicting labels (curation.label_conflict), on generated copies of what
real collections hold: BUSI-style `benign (1)_mask.png` / `x (1)_mask_1.png` beside images,
`Test_Image_N` / `mask_N` pairs, masks without an image, anti-aliased, JPEG, 16-bit and colour
masks, multi-class label maps."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from echocare_dist.config import load_config
from echocare_dist.curation import MappingError, build_shards
from echocare_dist.curation.mapping import load_mapping
from echocare_dist.curation.masklike import is_mask_like_image, is_mask_like_name, mask_name_pattern
from echocare_dist.curation.report import format_summary
from echocare_dist.shardfmt import Manifest
from echocare_dist.synth.patterns import bmode_still, sector_frame
from echocare_dist.synth.traps import busi_like


def lesion_mask(h=300, w=400, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (int(w * rng.uniform(.3, .7)), int(h * rng.uniform(.3, .7))), (w // 6, h // 8),
                float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    return m


def mask_variants(m: np.ndarray) -> dict[str, np.ndarray]:
    h, w = m.shape
    jpeg = cv2.imdecode(cv2.imencode(".jpg", m, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_GRAYSCALE)
    classes = (m > 127).astype(np.uint8) + (np.arange(w)[None, :] > w // 2).astype(np.uint8) * 2
    return {"binary": m, "empty": np.zeros_like(m), "resized": cv2.resize(m, (w // 3, h // 3)),
            "upscaled": cv2.resize(m, (int(w * 1.7), int(h * 1.7)), interpolation=cv2.INTER_CUBIC),
            "blurred": cv2.GaussianBlur(m, (5, 5), 0), "jpeg70": jpeg,
            "16bit 0/65535": m.astype(np.uint16) * 257, "16bit 0/1": (m > 127).astype(np.uint16),
            "colour": np.dstack([m, np.zeros_like(m), m // 2]), "bool": m > 127,
            "label map 0-3": classes, "label map 0-255": classes * 85}


@pytest.mark.parametrize("variant", list(mask_variants(lesion_mask())))
def test_masks_are_mask_like_in_every_form(variant):
    assert is_mask_like_image(mask_variants(lesion_mask(seed=3))[variant]), variant


def test_ultrasound_frames_are_not_mask_like():
    rng = np.random.default_rng(0)
    frames = [sector_frame(300, 400, seed=s)[0] for s in range(4)]
    frames += [bmode_still(rng, 320, 240) for _ in range(4)]
    frames.append(busi_like(seed=2)[0])  # smooth: low speckle contrast, but many gray levels
    mostly_black = np.zeros((600, 800), np.uint8)  # a small sector in a big black screenshot
    mostly_black[250:330, 350:450] = sector_frame(80, 100, seed=7, border_text=False)[0]
    frames.append(mostly_black)
    assert not any(is_mask_like_image(f) for f in frames)


def test_mask_names():
    for name in ("benign (1)_mask.png", "x (1)_mask_1.png", "mask_12.png", "Mask_3.PNG", "case3_seg.png",
                 "liver_label.png", "a/b/gt_labels.tif"):
        assert is_mask_like_name(name), name
    for name in ("benign (1).png", "Test_Image_4.png", "masked/scan 1.png", "segment.png"):
        assert not is_mask_like_name(name), name
    assert mask_name_pattern("Test_Image_4.png", ("test_image_*",)) == "test_image_*"


# ------------------------------------------------------------------------------ the builder
def write_collection(root: Path) -> dict:
    """A BUSI-like folder (images with masks beside them), a Test_Image_N / mask_N folder, a
    `masks/` folder without images, and odd masks; returns the file names by expected fate."""
    fate: dict[str, list[str]] = {"sample": [], "mask_like": [], "excluded": []}
    benign = root / "busi" / "benign"
    benign.mkdir(parents=True)
    for i in range(1, 4):
        img, _ = sector_frame(240 + 10 * i, 320, seed=40 + i)
        cv2.imwrite(str(benign / f"benign ({i}).png"), img)
        cv2.imwrite(str(benign / f"benign ({i})_mask.png"), lesion_mask(240 + 10 * i, 320, seed=i))
        fate["sample"].append(f"benign ({i}).png")
        fate["mask_like"].append(f"benign ({i})_mask.png")
    cv2.imwrite(str(benign / "benign (2)_mask_1.png"), lesion_mask(260, 320, seed=9))
    fate["mask_like"].append("benign (2)_mask_1.png")
    thy = root / "thyroid"
    thy.mkdir()
    for i in range(1, 3):
        cv2.imwrite(str(thy / f"Test_Image_{i}.png"), sector_frame(260, 300, seed=60 + i)[0])
        cv2.imwrite(str(thy / f"mask_{i}.png"), lesion_mask(260, 300, seed=20 + i))
        fate["sample"].append(f"Test_Image_{i}.png")
        fate["mask_like"].append(f"mask_{i}.png")
    orphans = root / "busi" / "masks"  # masks with no matching image, names that say nothing
    orphans.mkdir()
    cv2.imwrite(str(orphans / "0007.png"), lesion_mask(seed=7))
    Image.fromarray(lesion_mask(seed=8).astype(np.uint16) * 257).save(orphans / "0008 deep.png")  # 16-bit
    Image.fromarray(np.dstack([lesion_mask(seed=9), np.zeros((300, 400), np.uint8),
                               lesion_mask(seed=10)])).save(orphans / "0009 colour.png")
    fate["mask_like"] += ["0007.png", "0008 deep.png", "0009 colour.png"]
    (root / "busi" / "annotations").mkdir()
    cv2.imwrite(str(root / "busi" / "annotations" / "overlay 1.png"), sector_frame(200, 260, seed=5)[0])
    cv2.imwrite(str(benign / "benign (1) thumb.png"), sector_frame(200, 260, seed=6)[0])
    fate["excluded"] += ["overlay 1.png", "benign (1) thumb.png"]
    return fate


@pytest.fixture(scope="module")
def collection(tmp_path_factory, ontology):
    base = tmp_path_factory.mktemp("masks")
    fate = write_collection(base)
    mapping = base / "m.yaml"
    mapping.write_text(
        "exclude: ['**/annotations/**']\n"
        "sources:\n"
        "  - {name: BUSI, root: busi, labels: [breast], exclude: ['*thumb*']}\n"
        "  - {name: Thyroid, root: thyroid, labels: [thyroid]}\n")
    cfg = load_config("tiny_cpu", ["curation.workers=1", "curation.deid=false"])
    manifest = build_shards([mapping], base / "shards", cfg, ontology, progress=False)
    return base, fate, manifest


def sample_paths(shard_dir: Path) -> list[str]:
    out = []
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            out += [json.loads(tf.extractfile(m).read())["path"] for m in tf if m.name.endswith(".json")]
    return out


def test_no_mask_reaches_the_shards(collection):
    base, fate, m = collection
    names = sorted(Path(p).name for p in sample_paths(base / "shards"))
    assert names == sorted(fate["sample"])
    rejected = m.rejected["mask_like"]
    assert sorted(Path(p).name for p in rejected["paths"]) == sorted(fate["mask_like"])
    why = {Path(d["path"]).name: d["detail"] for d in rejected["details"]}
    assert "'*_mask*'" in why["benign (1)_mask.png"] and "'mask_*'" in why["mask_1.png"]
    assert "segmentation mask" in why["0008 deep.png"] and "segmentation mask" in why["0009 colour.png"]
    assert sorted(Path(p).name for p in m.excluded["paths"]) == sorted(fate["excluded"])
    assert m.excluded["count"] == 2 and "excluded 2" in format_summary(m)
    assert "mask_like 9" in format_summary(m)


def test_allow_mask_like_opts_a_source_back_in(tmp_path, ontology):
    root = tmp_path / "src"
    root.mkdir()
    cv2.imwrite(str(root / "unlabeled_scan 1.png"), sector_frame(240, 320, seed=3)[0])  # matches *label*
    mapping = tmp_path / "m.yaml"
    cfg = load_config("tiny_cpu", ["curation.workers=1", "curation.deid=false"])
    mapping.write_text("sources:\n  - {name: s, root: src, labels: []}\n")
    m = build_shards([mapping], tmp_path / "a", cfg, ontology, progress=False)
    assert m.num_samples == 0 and m.rejected["mask_like"]["count"] == 1
    mapping.write_text("sources:\n  - {name: s, root: src, labels: [], allow_mask_like: true}\n")
    m = build_shards([mapping], tmp_path / "b", cfg, ontology, progress=False)
    assert m.num_samples == 1 and m.rejected["mask_like"]["count"] == 0
    patterns = load_config("tiny_cpu", ["curation.workers=1", "curation.deid=false",
                                        "curation.mask_name_patterns=[\"*_mask*\"]"])
    mapping.write_text("sources:\n  - {name: s, root: src, labels: []}\n")
    assert build_shards([mapping], tmp_path / "c", patterns, ontology, progress=False).num_samples == 1


def test_bad_exclude_and_allow_values_name_the_mapping(tmp_path, ontology):
    (tmp_path / "src").mkdir()
    mapping = tmp_path / "m.yaml"
    for text, needle in (("exclude: 3\nsources:\n  - {name: s, root: src}\n", "exclude must be"),
                         ("sources:\n  - {name: s, root: src, exclude: [1]}\n", "exclude must be"),
                         ("sources:\n  - {name: s, root: src, allow_mask_like: 'yes'}\n", "allow_mask_like")):
        mapping.write_text(text)
        with pytest.raises(MappingError, match=needle) as exc:
            load_mapping(mapping, ontology)
        assert str(mapping) in str(exc.value)


# ------------------------------------------------------------------------- label conflicts
def conflict_build(tmp_path: Path, ontology, policy: str | None):
    root = tmp_path / "src"
    for folder in ("benign", "malignant", "unsorted"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    same, _ = sector_frame(260, 340, seed=11)
    for folder in ("benign", "malignant", "unsorted"):  # one scan filed three times
        cv2.imwrite(str(root / folder / "scan 7.png"), same)
    cv2.imwrite(str(root / "unsorted" / "scan 8.png"), sector_frame(260, 340, seed=12)[0])
    cv2.imwrite(str(root / "benign" / "scan 8.png"), sector_frame(260, 340, seed=12)[0])  # no conflict
    mapping = tmp_path / "m.yaml"
    mapping.write_text("sources:\n  - name: s\n    root: src\n    labels: []\n    rules:\n"
                       "      - {glob: 'benign/*', labels: [breast]}\n"
                       "      - {glob: 'malignant/*', labels: [breast_mass]}\n")
    over = ["curation.workers=1", "curation.deid=false"] + ([f"curation.label_conflict={policy}"] if policy else [])
    out = tmp_path / f"shards-{policy}"
    return build_shards([mapping], out, load_config("tiny_cpu", over), ontology, progress=False), out


def labels_in(out: Path) -> dict[str, tuple[list, bytes]]:
    got = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                prov = json.loads(data)
                got[prov["path"]] = (prov["labels"], members[name[:-5] + ".lbl"])
    return got


@pytest.mark.parametrize("policy, expect", [(None, []), ("first", ["breast"]),
                                            ("union", ["breast", "breast_mass"])])
def test_label_conflicts_are_reported_and_settled(tmp_path, ontology, policy, expect):
    m, out = conflict_build(tmp_path, ontology, policy)
    assert m.num_samples == 2
    assert len(m.label_conflicts) == 1  # scan 8 (labelled + unlabeled copy) is no conflict
    c = m.label_conflicts[0]
    assert c["path"].endswith("benign/scan 7.png") and c["policy"] == (policy or "drop")
    assert sorted(o["path"].split("src/")[1] for o in c["others"]) == ["malignant/scan 7.png", "unsorted/scan 7.png"]
    assert c["resolved"] == expect
    labels, lbl = labels_in(out)["benign/scan 7.png"]
    assert labels == expect
    np.testing.assert_array_equal(np.frombuffer(lbl, np.int8), ontology.label_vector(expect))
    assert m.per_node["breast_mass"] == (1 if policy == "union" else 0)
    assert "label conflicts: 1" in format_summary(m)


def test_old_manifests_without_the_new_fields_still_read(collection):
    base, _, m = collection
    data = json.loads((base / "shards" / "manifest.json").read_text())
    for key in ("excluded", "label_conflicts"):
        data.pop(key)
    old = Manifest.from_dict(data)
    assert old.label_conflicts is None and old.excluded is None and old.num_samples == m.num_samples
    assert "label conflicts" not in format_summary(old)


def test_curation_options_are_validated_by_key():
    from echocare_dist.config import ConfigError
    assert load_config("tiny_cpu").curation.near_dedup is True  # on by default
    for item, needle in (("curation.label_conflict=majority", "curation.label_conflict"),
                         ("curation.crop_max_discard=1.5", "curation.crop_max_discard"),
                         ("curation.crop_min_content=-0.1", "curation.crop_min_content"),
                         ("curation.mask_name_patterns=[\"\"]", "curation.mask_name_patterns")):
        with pytest.raises(ConfigError, match=needle):
            load_config("tiny_cpu", [item])
