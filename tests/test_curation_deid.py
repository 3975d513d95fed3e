"""De-identification at build time (curation/deid.py, curation/burnedin.py, docs/deid.md).

A collection whose folder carries a fake patient name, whose DICOM header names the patient and
whose pixels have the name burned in is built into shards; no trace of the name or the ID may
reach a shard member, an index, the manifest or the resolved config, while the restricted path
map (mode 0600) still leads an authorised user back to every original.
"""
from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from echocare_dist.config import load_config
from echocare_dist.curation import CurationError, MappingError, build_shards, verify_shards
from echocare_dist.curation.burnedin import blank_boxes, find_text_boxes
from echocare_dist.curation.deid import (ALLOWED_DICOM, default_map_path, lookup, read_path_map, scrub)
from echocare_dist.curation.mapping import load_mapping
from echocare_dist.curation.preprocess import FrameParams, crop_content
from echocare_dist.curation.verify import verify_shard
from echocare_dist.shardfmt import Manifest
from echocare_dist.synth.patterns import sector_frame
from echocare_dist.synth.writers import encode_dicom

NAME_FOLDER = "DOE_JANE_PQKX731"
SECRETS = ("doe", "jane", "pqkx731", "st. elsewhere")   # what must never leave the hospital (lower case)


def with_name(img: np.ndarray, y: int) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, "DOE JANE", (img.shape[1] // 3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1)
    return out


def dicom_bytes(frame: np.ndarray) -> bytes:
    import pydicom
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(frame, uid_seed="deid", frame_time_ms=40.0,
                                                 study_date="20240101", description="DOE JANE thyroid")))
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PQKX731"
    ds.InstitutionName = "St. Elsewhere"
    ds.ManufacturerModelName = "SONO-9"
    ds.PixelSpacing = [0.1, 0.1]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_collection(root: Path) -> Path:
    folder = root / "export" / NAME_FOLDER
    folder.mkdir(parents=True)
    for i in range(3):
        img, _ = sector_frame(320, 400, seed=40 + i)
        cv2.imwrite(str(folder / f"DOE JANE scan {i}.png"), with_name(img, 170) if i == 0 else img)
    img, _ = sector_frame(320, 400, seed=50)
    (folder / "DOE JANE cine.dcm").write_bytes(dicom_bytes(with_name(img, 170)))
    (folder / "DOE JANE broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"DOE" * 10)
    (folder / "DOE JANE notes.txt").write_text("not an image")
    mapping = root / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"sources": [{"name": "hospital", "root": "export", "labels": []}]}))
    return mapping


def config(*extra: str):
    return load_config("tiny_cpu", ["curation.workers=1", "curation.near_dedup=false", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory, ontology):
    base = tmp_path_factory.mktemp("deid")
    mapping = write_collection(base)
    out = base / "open-v1"
    old = os.umask(0o022)
    try:
        manifest = build_shards([mapping], out, config(), ontology, progress=False)
    finally:
        os.umask(old)
    return base, mapping, out, manifest


def samples(out: Path) -> list[tuple[str, dict, bytes]]:
    found = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                found.append((key, json.loads(data), members[f"{key}.jpg"]))
    return found


def test_no_identifier_reaches_the_shard_set(built):
    base, _, out, manifest = built
    assert manifest.num_samples == 4 and manifest.rejected["corrupt"]["count"] == 1
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".tar", ".idx", ".json", ".yaml"}
    for path in files:
        text = path.read_bytes().decode("latin-1").lower()
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {path.relative_to(out)}"
    assert str(base).lower() not in (out / "manifest.json").read_text().lower()  # no root locations either


def test_samples_carry_path_ids_and_only_allowed_dicom_tags(built):
    _, _, out, manifest = built
    found = samples(out)
    assert all(p["deid"] and len(p["path"]) == 24 and p["path"] != key for key, p, _ in found)
    dicom = [p["dicom"] for _, p, _ in found if "dicom" in p]
    assert dicom == [{"modality": "US", "model": "SONO-9", "pixel_spacing": [0.1, 0.1]}]
    assert set(dicom[0]) <= set(ALLOWED_DICOM.values())
    assert manifest.format == 2 and manifest.deid["enabled"] and manifest.deid["sources"] == ["hospital"]
    assert "root" not in manifest.sources[0] and "mapping" not in manifest.sources[0]
    assert verify_shards(out).ok


def test_the_restricted_map_leads_back_to_the_originals(built):
    base, _, out, manifest = built
    map_path = default_map_path(out)
    assert map_path.parent == out.parent and stat.S_IMODE(map_path.stat().st_mode) == 0o600
    doc = read_path_map(map_path)
    assert doc["salt_id"] == manifest.deid["salt_id"]
    by_path = {}
    for key, prov, _ in samples(out):
        found = lookup(out, [key])[key]
        assert found["path"] == lookup(out, [prov["path"]])[prov["path"]]["path"]
        by_path[Path(found["path"]).name] = prov
    assert set(by_path) == {"DOE JANE scan 0.png", "DOE JANE scan 1.png", "DOE JANE scan 2.png", "DOE JANE cine.dcm"}
    assert all(Path(lookup(out, [p["path"]])[p["path"]]["path"]).is_file() for p in by_path.values())
    broken = manifest.rejected["corrupt"]["details"][0]
    assert lookup(out, [broken["path"]])[broken["path"]]["path"].endswith("DOE JANE broken.png")
    with pytest.raises(CurationError, match="neither a sample key nor a path id"):
        lookup(out, ["0123"])


def test_burned_in_names_are_flagged_for_the_audit(built):
    _, _, out, manifest = built
    flagged = manifest.deid["burned_in_text"]
    names = {Path(lookup(out, [s["path"]])[s["path"]]["path"]).name for s in flagged["samples"]}
    assert flagged["action"] == "flag" and names == {"DOE JANE scan 0.png", "DOE JANE cine.dcm"}
    by_key = {key: prov for key, prov, _ in samples(out)}
    for s in flagged["samples"]:
        (x0, y0, x1, y1), = s["boxes"]
        assert by_key[s["key"]]["text_boxes"] == s["boxes"] and not by_key[s["key"]]["text_blanked"]
        assert 100 <= x0 < x1 <= 340 and 145 <= y0 < 170 < y1 <= 185  # around the text drawn at y=170


def test_rebuild_keeps_the_salt_and_a_lost_map_is_refused(built, ontology, tmp_path):
    base, mapping, out, manifest = built
    again = build_shards([mapping], out, config(), ontology, progress=False)
    assert again.to_dict() == manifest.to_dict()
    moved = tmp_path / "elsewhere.json"
    default_map_path(out).rename(moved)
    try:
        with pytest.raises(CurationError, match="path map"):
            build_shards([mapping], out, config(), ontology, progress=False)
        assert Manifest.read(out).to_dict() == manifest.to_dict()  # nothing rebuilt under a new salt
        again = build_shards([mapping], out, config(f"curation.deid_map={moved}"), ontology, progress=False)
        assert again.to_dict() == manifest.to_dict()
    finally:
        moved.rename(default_map_path(out))
    with pytest.raises(CurationError, match="inside the shard directory"):
        build_shards([mapping], out, config(f"curation.deid_map={out / 'paths.json'}"), ontology, progress=False)


def test_blank_zeroes_the_text_and_opt_out_keeps_paths(built, ontology, tmp_path):
    base, mapping, _, _ = built
    blanked = build_shards([mapping], tmp_path / "blank", config("curation.burned_in_text=blank"), ontology,
                           progress=False)
    for s in blanked.deid["burned_in_text"]["samples"]:
        prov, jpg = next((p, j) for key, p, j in samples(tmp_path / "blank") if key == s["key"])
        img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
        cx0, cy0, cx1, _ = prov["crop"]
        scale = prov["width"] / (cx1 - cx0)  # stored image vs the crop (1 unless downscaled)
        x0, y0, x1, y1 = (round((v - o) * scale) for v, o in zip(s["boxes"][0], (cx0, cy0, cx0, cy0)))
        assert prov["text_blanked"] and img[y0 + 2:y1 - 2, x0 + 2:x1 - 2].max() < 40
    public = build_shards([mapping], tmp_path / "public", config("curation.deid=false"), ontology, progress=False)
    paths = sorted(p["path"] for _, p, _ in samples(tmp_path / "public"))
    assert paths[0] == f"{NAME_FOLDER}/DOE JANE cine.dcm" and not public.deid["enabled"]
    assert not default_map_path(tmp_path / "public").exists()
    # A set claiming de-identification whose samples still name paths fails verification.
    entry = public.shards[0]
    found = verify_shard(tmp_path / "public" / entry.name, entry, public.ontology_nodes, public.ontology_hash,
                         None, frozenset({"hospital"}))
    assert any("is de-identified, but the sample stores a path" in p for p in found["problems"])


def test_a_mapping_can_opt_a_public_source_out(tmp_path, ontology):
    mapping = write_collection(tmp_path)
    doc = yaml.safe_load(mapping.read_text())
    doc["sources"][0]["deid"] = "no"
    mapping.write_text(yaml.safe_dump(doc))
    with pytest.raises(MappingError, match="deid must be true or false"):
        load_mapping(mapping, ontology)
    doc["sources"][0]["deid"] = False
    mapping.write_text(yaml.safe_dump(doc))
    assert load_mapping(mapping, ontology)[0].deid is False


def test_decoder_messages_lose_the_file_name():
    msg = "cannot identify image file '/data/x/DOE_JANE/a 1.png' (a 1.png)"
    assert scrub(msg, "/data/x/DOE_JANE/a 1.png", "DOE_JANE/a 1.png", "ab" * 12) == \
        f"cannot identify image file '{'ab' * 12}' ({'ab' * 12})"
    assert scrub(msg, "/p", "p", "/p") == msg  # not de-identified: unchanged


def test_text_detector_finds_printed_lines_not_speckle():
    params = FrameParams.from_config(load_config("tiny_cpu").curation)
    found = 0
    for seed in range(12):
        img, _ = sector_frame(320, 400, seed=seed)
        assert find_text_boxes(crop_content(img, params)[0]) == [], seed   # speckle and organ: nothing
        marked = crop_content(with_name(img, 170), params)[0]
        boxes = find_text_boxes(marked)
        assert len(boxes) <= 1, seed
        if boxes:
            found += 1
            (x0, y0, x1, y1), = boxes
            assert blank_boxes(marked, boxes)[y0:y1, x0:x1].max() == 0 and marked[y0:y1, x0:x1].max() == 255
    # White text across the saturated organ can vanish into it (benchmarks/burned_in_text.py: rates).
    assert found >= 10
    with pytest.raises(ValueError, match="2-D uint8"):
        find_text_boxes(np.zeros((4, 4, 3), np.uint8))


def test_audit_lists_the_flagged_and_lookup_names_the_original(built, tmp_path, capsys):
    from echocare_dist.cli import main
    from echocare_dist.curation.audit import audit_items
    _, _, out, manifest = built
    flagged = manifest.deid["burned_in_text"]["samples"]
    assert main(["shards", "audit", str(out), "--out", str(tmp_path / "audit.png")]) == 0
    printed = capsys.readouterr().out
    assert f"burned-in text: {len(flagged)} sample(s) flagged" in printed
    assert all(f["key"] in printed and f["path"] in printed for f in flagged)
    assert (tmp_path / "audit.png").stat().st_size > 0
    items = audit_items(out, manifest)
    assert {tuple(map(tuple, it.text_boxes)) for it in items[:len(flagged)]} == \
        {tuple(map(tuple, f["boxes"])) for f in flagged}  # flagged first, originals found via the map
    assert all(Path(it.path).is_file() and NAME_FOLDER in it.path and NAME_FOLDER not in it.shown for it in items)
    # Without the map (an auditor not allowed to read it) the sheet still renders, originals unavailable.
    from echocare_dist.curation.audit import crop_audit
    png, blind = crop_audit(out, tmp_path / "blind.png", map_path=tmp_path / "no-access.json")
    assert png.stat().st_size > 0 and all(it.path == "" for it in blind) and len(blind) == len(items)
    from echocare_dist.curation.audit import stored_view
    stored, boxes = stored_view(out, blind[0])   # the stored image is shown instead, boxes moved onto it
    (x0, y0, x1, y1), = boxes
    assert stored.shape == (blind[0].crop[3] - blind[0].crop[1], blind[0].crop[2] - blind[0].crop[0])
    assert 0 <= x0 < x1 <= stored.shape[1] and 0 <= y0 < y1 <= stored.shape[0] and stored[y0:y1, x0:x1].max() > 200
    key = flagged[0]["key"]
    assert main(["shards", "lookup", str(out), key]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{key}\thospital\t") and line.split("\t")[2] == lookup(out, [key])[key]["path"]
    assert main(["shards", "lookup", str(out), "ffff", "--map", str(tmp_path / "none.json")]) == 2
    assert "path map" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_gets_an_id_too(tmp_path, ontology):
    images = tmp_path / "src" / NAME_FOLDER
    images.mkdir(parents=True)
    cv2.imwrite(str(images / "ok.png"), sector_frame(150, 200, seed=3)[0])
    bad = os.fsdecode(b"DOE \xff\xfe.png")
    Path(images, bad).write_bytes(b"not an image at all")
    mapping = tmp_path / "m.yaml"
    mapping.write_text(yaml.safe_dump({"sources": [{"name": "s", "root": "src", "labels": []}]}))
    m = build_shards([mapping], tmp_path / "o", config(), ontology, progress=False)
    pid = m.rejected["corrupt"]["paths"][0]
    assert "doe" not in (tmp_path / "o" / "manifest.json").read_text().lower()
    assert lookup(tmp_path / "o", [pid])[pid]["path"].endswith(f"{NAME_FOLDER}/{bad}")


def test_a_given_salt_makes_two_shard_sets_agree(built, ontology, tmp_path, monkeypatch):
    _, mapping, out, _ = built
    monkeypatch.setenv("ECHOCARE_DEID_SALT", "a shared secret of ours")
    a = build_shards([mapping], tmp_path / "a", config(), ontology, progress=False)
    b = build_shards([mapping], tmp_path / "b", config(), ontology, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.deid["salt_id"] == b.deid["salt_id"] != Manifest.read(out).deid["salt_id"]
    with pytest.raises(CurationError, match="differs from the salt stored in the path map"):
        build_shards([mapping], out, config(), ontology, progress=False)
    monkeypatch.setenv("ECHOCARE_DEID_SALT", "short")
    with pytest.raises(CurationError, match="at least 16 characters"):
        build_shards([mapping], tmp_path / "c", config(), ontology, progress=False)
