"""Field-of-view crop (curation/fov.py) on frames built to fool the earlier rule (synth/traps.py).

The earlier rule (keep pieces near the largest one's area; nothing speckled -> biggest blobs)
failed each trap: it kept the header band, cut the lesion strip, and on the BUSI-like frame kept
the faint patches in the depth and threw the tissue away."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from echocare_dist.config import load_config
from echocare_dist.curation.media import to_gray
from echocare_dist.curation.preprocess import FrameParams, Rejected, crop_content, curate_frame, phash64
from echocare_dist.curation.neardup import max_distance
from echocare_dist.synth.traps import TRAPS, busi_cropped, busi_like, draw_calipers, trap_frame


@pytest.fixture(scope="module")
def params():
    return FrameParams.from_config(load_config("tiny_cpu").curation)


def close_to(box, truth, tol):
    return all(abs(a - b) <= tol for a, b in zip(box, truth))


@pytest.mark.parametrize("kind", TRAPS)
def test_traps_crop_to_the_field_of_view(kind, params):
    img, truth = trap_frame(kind, seed=1)
    gray = to_gray(img) if img.ndim == 3 else img
    _, box, discarded = crop_content(gray, params)
    assert close_to(box, truth, params.crop_margin + 1), (kind, box, truth)
    assert discarded <= params.max_discard


def test_busi_like_frame_keeps_the_tissue_not_the_faint_depth(params):
    img, tissue = busi_like(seed=1)
    _, box, _ = crop_content(img, params)
    # The tissue band is all kept (the earlier rule kept a strip of faint depth patches instead).
    assert box[0] <= tissue[0] + 1 and box[1] <= tissue[1] + 1 and box[2] >= tissue[2] - 1
    assert box[3] >= tissue[3] - 1


@pytest.mark.parametrize("gap", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_already_cropped_frame_keeps_its_dim_deep_band(seed, gap, params):
    # Issue 13 item 2: on BUSI frames (no border) the crop dropped the dim deep band under
    # dark_threshold (30-40 % of the height), faint tissue included.
    img, full = busi_cropped(seed=seed, gap=gap)
    deep = img[2 * img.shape[0] // 3:]
    assert deep.min() >= 1 and np.median(deep) <= 12  # dim, never true black
    out, box, discarded = crop_content(img, params)
    assert (box[3] - box[1]) >= 0.95 * full[3] and (box[2] - box[0]) >= 0.95 * full[2], box
    assert discarded == 0.0
    # Nothing inside the kept box is blanked.
    np.testing.assert_array_equal(out, img[box[1]:box[3], box[0]:box[2]])


def test_a_real_border_is_still_cropped_when_a_dim_flat_bar_reaches_the_edge(params):
    # A flat dim status bar along the bottom edge (signal above the floor, but no speckle) and
    # empty border rows between it and the sector: still border, the crop stays on the sector.
    from echocare_dist.synth.patterns import sector_frame

    img, sector = sector_frame(360, 480, seed=3, border_text=True)
    img[-10:] = 8
    _, box, _ = crop_content(img, params)
    assert close_to(box, sector, params.crop_margin), (box, sector)


def test_calipers_on_and_off_crop_alike_and_are_near_duplicates(params):
    img, sector = trap_frame("calipers", seed=2)
    marked = draw_calipers(img, sector, seed=2)
    assert (marked != img).sum() > 50
    a, b = curate_frame(img, params), curate_frame(marked, params)
    assert close_to(a.crop, b.crop, 1)
    small_a = cv2.resize(img[a.crop[1]:a.crop[3], a.crop[0]:a.crop[2]], (128, 128))
    small_b = cv2.resize(marked[b.crop[1]:b.crop[3], b.crop[0]:b.crop[2]], (128, 128))
    assert bin(phash64(small_a) ^ phash64(small_b)).count("1") <= max_distance(0.95)
    assert bin(a.phash ^ b.phash).count("1") <= max_distance(0.95)


def test_flat_graphics_and_masks_are_crop_failed_not_cropped(params):
    # A gray-scale ramp with a logo and no image: the earlier size-only fallback cropped to it.
    img = np.zeros((240, 320), np.uint8)
    img[20:220, 40:120] = np.linspace(30, 255, 200).astype(np.uint8)[:, None]
    cv2.circle(img, (220, 120), 60, 200, -1)
    with pytest.raises(Rejected) as exc:
        crop_content(img, params)
    assert exc.value.reason == "crop_failed" and "no textured content" in str(exc.value)


def test_a_crop_that_would_drop_real_content_is_rejected(params):
    # Two speckled views far apart, the second 10 % of the first: kept only from
    # crop_component_fraction (0.2), so it is dropped and counted as discarded (~9 %).
    rng = np.random.default_rng(0)
    img = np.zeros((300, 600), np.uint8)
    img[20:280, 10:380] = np.clip(rng.rayleigh(50, (260, 370)) + 20, 0, 255).astype(np.uint8)
    img[100:200, 500:596] = np.clip(rng.rayleigh(50, (100, 96)) + 20, 0, 255).astype(np.uint8)
    with pytest.raises(Rejected) as exc:
        crop_content(img, params)
    assert exc.value.reason == "crop_failed" and "leave out" in str(exc.value)
    lenient = FrameParams(**{**params.__dict__, "max_discard": 0.2})
    _, box, discarded = crop_content(img, lenient)
    assert box[2] <= 382 and 0.05 < discarded < 0.2
    both = FrameParams(**{**params.__dict__, "component_fraction": 0.05})  # a second view from 5 %
    _, box, discarded = crop_content(img, both)
    assert box[2] >= 594 and discarded == 0.0


def test_near_empty_frames_stay_too_few_pixels(params):
    img = np.zeros((200, 260), np.uint8)
    with pytest.raises(Rejected) as exc:
        crop_content(img, params)
    assert exc.value.reason == "too_few_pixels"


def test_audit_sheet_lists_worst_crops_first(tmp_path, ontology, capsys):
    from PIL import Image

    from echocare_dist.cli import main
    from echocare_dist.curation import build_shards
    from echocare_dist.curation.audit import crop_audit

    root = tmp_path / "src"
    root.mkdir()
    cv2.imwrite(str(root / "a good.png"), trap_frame("calipers", seed=3)[0])
    cv2.imwrite(str(root / "b busi like.png"), busi_like(seed=3)[0])
    flat = np.zeros((240, 320), np.uint8)
    flat[20:220, 40:120] = np.linspace(30, 255, 200).astype(np.uint8)[:, None]
    cv2.circle(flat, (220, 120), 60, 200, -1)
    cv2.imwrite(str(root / "c graphics.png"), flat)
    mapping = tmp_path / "m.yaml"
    mapping.write_text("sources:\n  - {name: S, root: src, labels: [liver]}\n")
    out = tmp_path / "shards"
    cfg = load_config("tiny_cpu", ["curation.workers=1", "curation.deid=false"])  # captions name the files
    m = build_shards([mapping], out, cfg, ontology, progress=False)
    assert m.num_samples == 2 and m.rejected["crop_failed"]["count"] == 1
    png, items = crop_audit(out, tmp_path / "audit.png", num=8, tile=128)
    assert [Path(it.path).name for it in items][0] == "c graphics.png" and items[0].crop is None
    assert items[1].discarded >= items[2].discarded
    kept = {Path(it.path).name: it for it in items[1:]}
    assert set(kept) == {"a good.png", "b busi like.png"} and all(it.labels == ["liver"] for it in kept.values())
    assert all(it.source == "S" for it in items) and items[0].shown == "c graphics.png"
    with Image.open(png) as im:
        assert im.size == (3 * 128, 128 + 56)
    assert main(["shards", "audit", str(out), "--out", str(tmp_path / "cli.png")]) == 0
    assert "1 crop_failed shown" in capsys.readouterr().out and (tmp_path / "cli.png").stat().st_size > 1000
