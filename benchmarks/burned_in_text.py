"""Burned-in text detector (curation/burnedin.py): false positives and detection rate.

    python benchmarks/burned_in_text.py [--busi /tmp/busi/Dataset_BUSI_with_GT] [--synth-images 200]

Runs the detector on the kept region (the builder's crop) of
- the synthetic generator's still images (`echocare synth`, tiny_cpu preset): no text inside the
  kept region, so every flag is a false positive;
- the same frames with a line of text drawn inside the sector (several fonts, sizes and grey
  levels): every miss is a false negative;
- 100 `synth.patterns.sector_frame` frames (speckle with a saturated organ): false positives;
- BUSI (if present): real breast ultrasound; some images carry annotations inside the image,
  so the figure printed is the number flagged (listed with --list), not an error rate.
Prints counts and the time per frame.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from echocare_dist.config import load_config
from echocare_dist.curation.burnedin import find_text_boxes
from echocare_dist.curation.media import iter_frames, media_kind
from echocare_dist.curation.preprocess import FrameParams, Rejected, crop_content

FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX)


def kept_regions(paths, params: FrameParams, limit: int):
    for path in paths[:limit]:
        kind = media_kind(str(path))
        try:
            _, gray = next(iter_frames(Path(path), kind, 1))
            yield path, crop_content(gray, params)[0]
        except (Rejected, StopIteration, Exception):  # noqa: BLE001 - unusable frames are not measured
            continue


def with_text(region: np.ndarray, i: int) -> np.ndarray:
    out = region.copy()
    h, w = out.shape
    scale = (0.4, 0.5, 0.7)[i % 3] * max(1.0, w / 400)
    level = (255, 230, 200)[(i // 3) % 3]
    cv2.putText(out, "DOE^JANE 0421", (w // 5, h // 2), FONTS[i % len(FONTS)], scale, level,
                1 + (i // 9) % 2, cv2.LINE_AA if i % 2 else cv2.LINE_8)
    return out


def main() -> None:
    cv2.setNumThreads(1)  # the builder's per-worker budget
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busi", default="/tmp/busi/Dataset_BUSI_with_GT")
    ap.add_argument("--synth-images", type=int, default=200)
    ap.add_argument("--list", action="store_true", help="print the BUSI files flagged")
    args = ap.parse_args()
    cfg = load_config("tiny_cpu", [f"synth.num_images={args.synth_images}", "synth.num_videos=0"])
    params = FrameParams.from_config(cfg.curation)
    from echocare_dist.ontology import load_ontology
    from echocare_dist.paths import REPO_ROOT
    from echocare_dist.synth import generate_dataset
    ontology = load_ontology(REPO_ROOT / "configs" / "ontology" / "default.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "synth", cfg.synth, ontology)
        files = sorted(p for p in (Path(tmp) / "synth").rglob("*") if p.is_file() and media_kind(str(p)) == "image"
                       and "mask" not in p.name)
        regions = list(kept_regions(files, params, len(files)))
    t0 = time.perf_counter()
    fp = [p for p, r in regions if find_text_boxes(r)]
    dt = (time.perf_counter() - t0) / max(1, len(regions))
    hits = sum(bool(find_text_boxes(with_text(r, i))) for i, (_, r) in enumerate(regions))
    print(f"synthetic stills: {len(fp)} of {len(regions)} flagged without text (false positives), "
          f"{dt * 1e3:.2f} ms per frame")
    print(f"synthetic stills with a text line drawn inside: {hits} of {len(regions)} flagged")
    from echocare_dist.synth.patterns import sector_frame
    sectors = [crop_content(sector_frame(320, 400, seed=s)[0], params)[0] for s in range(100)]
    print(f"sector frames (bright organ): {sum(bool(find_text_boxes(r)) for r in sectors)} of 100 flagged")
    # Cost inside the build: curate_frame (crop, hash, downscale, JPEG) with and without the detector.
    import dataclasses
    from echocare_dist.curation.preprocess import curate_frame
    frames = [sector_frame(768, 1024, seed=s)[0] for s in range(10)]
    cost = {}
    for action in ("off", "flag"):
        p = dataclasses.replace(params, burned_in_text=action)
        t0 = time.perf_counter()
        for f in frames:
            curate_frame(f, p)
        cost[action] = (time.perf_counter() - t0) / len(frames)
    print(f"curate_frame 1024x768: {cost['off'] * 1e3:.1f} ms without the detector, {cost['flag'] * 1e3:.1f} ms "
          f"with it (+{cost['flag'] / cost['off'] - 1:.0%})")
    busi = Path(args.busi)
    if busi.is_dir():
        paths = sorted(p for p in busi.rglob("*.png") if "_mask" not in p.name)
        flagged = []
        n = 0
        for p, r in kept_regions(paths, params, len(paths)):
            n += 1
            if find_text_boxes(r):
                flagged.append(p)
        print(f"BUSI: {len(flagged)} of {n} images flagged")
        if args.list:
            for p in flagged:
                print("  ", p.relative_to(busi))
        hits = sum(bool(find_text_boxes(with_text(r, i))) for i, (_, r) in enumerate(kept_regions(paths, params, 60)))
        print(f"BUSI with a text line drawn inside (first 60 images): {hits} flagged")


if __name__ == "__main__":
    main()
