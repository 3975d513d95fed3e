"""Shard builder units: cropping, downscaling, 16-bit scaling, the perceptual hash and the
near-duplicate index, media discovery, and label mappings (checked before any work)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from echocare_dist.config import load_config
from echocare_dist.curation import MappingError, build_shards
from echocare_dist.curation.mapping import load_mapping
from echocare_dist.curation.media import to_uint8
from echocare_dist.curation.neardup import NearDuplicateIndex, max_distance
from echocare_dist.curation.preprocess import FrameParams, crop_content, curate_frame, phash64
from echocare_dist.synth.patterns import sector_frame
from test_shards_data import curation_config


# ------------------------------------------------------------------------------------ units
def draw_graphics(img: np.ndarray) -> None:
    """Scanner overlays that are not text, right of the sector: a grey-scale bar and a logo, each
    thicker than the opening kernel and larger than `crop_component_fraction` of the sector, so
    only their flatness tells them apart from B-mode content."""
    h, w = img.shape
    img[100:300, w - 30:w - 8] = np.linspace(20, 255, 200).astype(np.uint8)[:, None]
    cv2.rectangle(img, (w - 80, 2), (w - 18, 64), 255, 1)
    cv2.circle(img, (w - 49, 33), 28, 230, -1)


def test_crop_removes_border_text_graphics_and_corner_glyphs():
    params = FrameParams.from_config(load_config("tiny_cpu").curation)
    clean, sector = sector_frame(360, 480, seed=3, border_text=False)
    texted, _ = sector_frame(360, 480, seed=3, border_text=True, corner_text=True)
    draw_graphics(texted)
    assert (texted != clean).sum() > 500  # the overlays are really there
    out, box, _ = crop_content(texted, params)
    assert all(abs(a - b) <= params.crop_margin for a, b in zip(box, sector)), (box, sector)
    # Border text and graphics are outside the box; the corner glyph inside the box is blanked:
    # the result equals the same frame cropped without any overlay.
    ref, ref_box, _ = crop_content(clean, params)
    assert box == ref_box
    np.testing.assert_array_equal(out, ref)
    # Without blanking the corner glyph stays; without the texture test the graphics count as
    # content (so the checks above test both).
    out_kept, _, _ = crop_content(texted, FrameParams(**{**params.__dict__, "blank_outside": False}))
    assert (out_kept != ref).sum() > 10
    _, box_flat, _ = crop_content(texted, FrameParams(**{**params.__dict__, "min_texture": 0.0}))
    assert box_flat[2] > box[2] + 40


def test_crop_keeps_a_sector_split_by_dark_fluid():
    params = FrameParams.from_config(load_config("tiny_cpu").curation)
    img, sector = sector_frame(400, 400, seed=5)
    x0, y0, x1, y1 = sector
    band = slice(y0 + (y1 - y0) // 3, y0 + (y1 - y0) // 2)
    fan = img[band, x0:x1] > 0
    img[band, x0:x1][fan] = 5  # anechoic fluid: below the dark threshold, cuts the fan in two
    out, box, _ = crop_content(img, params)
    assert all(abs(a - b) <= params.crop_margin for a, b in zip(box, sector)), (box, sector)
    # The fluid between the pieces is content (inside the hull): not blanked to 0.
    fluid = out[band.start - box[1]:band.stop - box[1], x0 - box[0]:x1 - box[0]]
    assert (fluid == 5).sum() >= 0.9 * fan.sum()


def test_downscale_keeps_the_dedupe_key():
    params = FrameParams.from_config(load_config("tiny_cpu").curation)
    img, _ = sector_frame(360, 480, seed=4)
    full = curate_frame(img, params)
    small = curate_frame(img, FrameParams(**{**params.__dict__, "max_side": 100}))
    assert max(small.width, small.height) == 100 < max(full.width, full.height)
    assert small.key == full.key  # the key hashes the cropped pixels before downscaling
    dec = cv2.imdecode(np.frombuffer(small.jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert dec.shape == (small.height, small.width)


def test_to_uint8_scales_16_bit_and_keeps_black():
    a = np.array([[0, 1024], [2048, 4095]], np.uint16)
    b = to_uint8(a)
    assert b.dtype == np.uint8 and b[0, 0] == 0 and b[1, 1] == 255 and 60 < b[0, 1] < 68


def test_phash_separates_near_and_different():
    a, _ = sector_frame(240, 320, seed=1, border_text=False)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    rec = cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_GRAYSCALE)
    b, _ = sector_frame(240, 320, seed=2, border_text=False)
    ham = lambda x, y: bin(phash64(x) ^ phash64(y)).count("1")  # noqa: E731
    assert ham(a, noisy) <= 3 and ham(a, rec) <= 3
    assert ham(a, b) >= 10


def test_near_duplicate_index_equals_brute_force():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 150, dtype=np.int64)]
    items = []
    for h in base:  # each base hash plus variants at distance 1..5 (threshold is 3 at 0.95)
        items.append(h)
        for d in (1, 3, 4, 5):
            bits = rng.choice(64, d, replace=False)
            items.append(h ^ sum(1 << int(b) for b in bits))
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    sim = 0.95
    d = max_distance(sim)
    assert d == 3
    index = NearDuplicateIndex(sim)
    got = [index.add(h, i) for i, h in enumerate(items)]
    kept: list[int] = []
    want = []
    for i, h in enumerate(items):
        hit = next((k for k in kept if bin(items[k] ^ h).count("1") <= d), None)
        want.append(hit)
        if hit is None:
            kept.append(i)
    assert [g is None for g in got] == [w is None for w in want]
    assert sum(g is not None for g in got) > 150  # many near duplicates were found


# ------------------------------------------------------------------------------------ mappings
def _write_mapping(tmp_path: Path, body: str) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True, exist_ok=True)
    p = tmp_path / "map.yaml"
    p.write_text(textwrap.dedent(body))
    return p


@pytest.mark.parametrize("body, needle", [
    ("sources:\n  - {name: a, root: data, labels: [thyroid, not_a_node]}\n", "'not_a_node'"),
    ("sources:\n  - name: a\n    root: data\n    labels: [thyroid]\n    rules:\n      - {glob: 'x/*', labels: [bogus_organ]}\n",
     "'bogus_organ'"),
    ("sources:\n  - {name: a, root: data, labels: [], colour: red}\n", "'colour'"),
    ("sources:\n  - {name: a, root: nowhere, labels: []}\n", "nowhere"),
    ("sources:\n  - {name: a, root: data, labels: []}\n  - {name: a, root: data, labels: []}\n", "'a'"),
    ("source:\n  - {name: a, root: data}\n", "'source'"),
])
def test_bad_mapping_fails_before_any_work(tmp_path, ontology, body, needle):
    mapping = _write_mapping(tmp_path, body)
    out = tmp_path / "out"
    with pytest.raises(MappingError) as err:
        build_shards([mapping], out, curation_config(), ontology, progress=False)
    assert needle in str(err.value) and str(mapping) in str(err.value)
    assert not out.exists()


def test_csv_unknown_node_names_line(tmp_path, ontology):
    mapping = _write_mapping(tmp_path, "sources:\n  - {name: a, root: data, labels: [], csv: l.csv}\n")
    (tmp_path / "data" / "l.csv").write_text("path,labels\nx.png,liver\ny.png,liver;livr\n")
    with pytest.raises(MappingError, match=r"line 3.*'livr'"):
        load_mapping(mapping, ontology)


def test_label_precedence_csv_rule_folder_default(tmp_path, ontology):
    mapping = _write_mapping(tmp_path, """\
        sources:
          - name: a
            root: data
            labels: [abdomen]
            rules:
              - {glob: "sub", labels: [kidney]}
              - {glob: "**/*.mp4", labels: [liver]}
              - {glob: "*cyst*", labels: [renal_cyst]}
            csv: l.csv
        """)
    (tmp_path / "data" / "l.csv").write_text("path,labels\n./sub/special one.png,renal_cortex\nsub/none.png,\n")
    src = load_mapping(mapping, ontology)[0]
    assert src.labels_for("sub/special one.png") == ("renal_cortex",)   # CSV beats rules
    assert src.labels_for("sub/none.png") == ()                         # CSV can unlabel
    assert src.labels_for("sub/deeper/x.png") == ("kidney",)            # folder glob covers subtree
    assert src.labels_for("clip.mp4") == ("liver",)                     # **/ matches at top level
    assert src.labels_for("a/b/clip.mp4") == ("liver",)
    assert src.labels_for("x/my cyst 2.png") == ("renal_cyst",)
    assert src.labels_for("other.png") == ("abdomen",)                  # source default


# ------------------------------------------------------------------------------------ discovery
def test_discovery_sorted_skips_hidden_and_survives_symlink_loops(tmp_path):
    from echocare_dist.curation.media import discover
    root = tmp_path / "root"
    (root / "b dir").mkdir(parents=True)
    img, _ = sector_frame(100, 120, seed=0)
    for name in ("b dir/z.png", "a.JPG", "._a.jpg", "b dir/notes.txt"):
        cv2.imwrite(str(root / name), img) if not name.endswith(".txt") else (root / name).write_text("x")
    (root / "b dir" / "loop").symlink_to(root, target_is_directory=True)
    (root / ".hidden").mkdir()
    cv2.imwrite(str(root / ".hidden" / "x.png"), img)
    files, skipped = discover(root)
    assert [f.relpath for f in files] == ["a.JPG", "b dir/z.png"]
    assert [Path(s).name for s in skipped] == ["notes.txt"]
