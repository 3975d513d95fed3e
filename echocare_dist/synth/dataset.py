"""`generate_dataset`: plan the synthetic collection (plan.py), render and write every file, then the
label mapping (labels.yaml), the per-file ground truth (synth_manifest.json) and a README.

Determinism: the plan comes from one RNG stream and every file from its own stream
`default_rng([seed, 2, index])`, and every encoder is byte-deterministic, so the same seed
gives byte-identical files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import yaml

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..config import SynthConfig
from ..ontology import Ontology, OntologyError
from . import catalog
from .catalog import SOURCES, SourceSpec
from .plan import SynthFile, plan_dataset
from .scanner import Shot
from .writers import encode_dicom, encode_image, write_video

MARKER = ".echocare-synth"       # marks a folder this generator owns (and may wipe on re-run)
MAPPING_NAME = "labels.yaml"
MANIFEST_NAME = "synth_manifest.json"
README_NAME = "README.txt"


@dataclass(frozen=True)
class SynthResult:
    root: Path                        # the dataset folder
    mapping: Path                     # labels.yaml (the label mapping contract)
    manifest: Path                    # synth_manifest.json (per-file ground truth)
    images: int                       # still image files, special cases included (== num_images)
    videos: int
    dicoms: int
    near_empty: int                   # expected to be rejected (< 1000 non-zero pixels)
    duplicates: int                   # exact pixel duplicates of another file
    near_duplicates: int
    corrupt: int                      # undecodable files
    masks: int
    files: tuple = ()

    def select(self, kind: str | None = None, role: str | None = None) -> list[SynthFile]:
        return [f for f in self.files if (kind is None or f.kind == kind) and (role is None or f.role == role)]

    def counts(self) -> str:
        return (f"{self.images} images ({self.near_empty} near-empty, {self.duplicates} duplicates, "
                f"{self.near_duplicates} near-duplicates, {self.corrupt} corrupt), {self.videos} videos, "
                f"{self.dicoms} DICOM, {self.masks} masks")

    def summary(self) -> str:
        return f"{self.counts()} in {self.root}; mapping {self.mapping}"


# ----------------------------------------------------------------------------- rendering
def _file_rng(cfg: SynthConfig, f: SynthFile) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 2, f.index])


def _as_mode(pixels: np.ndarray, mode: str) -> np.ndarray:
    # 16-bit exports use the full range (8-bit value * 257), as scanners that store 16 bits do.
    return pixels.astype(np.uint16) * np.uint16(257) if mode == "I;16" else pixels


def _render_still(f: SynthFile, cfg: SynthConfig, with_mask: bool = False):
    rng = _file_rng(cfg, f)
    shot = Shot(f.scene, f.height, f.width, rng, rgb=(f.mode == "RGB"), ecg=catalog.source(f.source).ecg)
    frame = shot.frame(with_mask=with_mask)
    return _as_mode(frame.pixels, f.mode), frame


def _near_empty(f: SynthFile, cfg: SynthConfig) -> np.ndarray:
    """A frame with far fewer than 1000 non-zero pixels: no probe contact, a frozen blank screen."""
    rng = _file_rng(cfg, f)
    img = np.zeros((f.height, f.width), np.uint8)
    if f.variant == "speckle_patch":
        side = int(rng.integers(10, 20))
        y, x = int(rng.integers(0, f.height - side)), int(rng.integers(0, f.width - side))
        img[y:y + side, x:x + side] = rng.integers(20, 160, size=(side, side), dtype=np.uint8)
    elif f.variant == "tiny_text":
        cv2.putText(img, "PROBE IDLE", (int(rng.integers(2, f.width // 3)), int(rng.integers(12, f.height - 4))),
                    cv2.FONT_HERSHEY_PLAIN, 0.7, 200, 1, cv2.LINE_8)
    if np.count_nonzero(img) >= 1000:
        raise RuntimeError(f"near-empty frame {f.path} has {np.count_nonzero(img)} non-zero pixels")
    return img


def _near_duplicate(pixels: np.ndarray, variant: str, rng: np.random.Generator) -> np.ndarray:
    """The same picture with a change a perceptual hash ignores; the black background stays black."""
    content = pixels > 0
    if variant == "noise":
        delta = rng.integers(-2, 3, size=pixels.shape)
    else:
        delta = np.full(pixels.shape, 3)
    return np.where(content, np.clip(pixels.astype(np.int16) + delta, 1, 255), 0).astype(np.uint8)


def _corrupt(f: SynthFile, cfg: SynthConfig) -> bytes:
    rng = _file_rng(cfg, f)
    if f.variant == "garbage_png":
        return rng.bytes(int(rng.integers(2048, 8192)))
    pixels, _ = _render_still(f, cfg)
    data = encode_image(pixels, f.format, cfg.jpeg_quality)
    # Cut inside the compressed data: the header parses, decoding the pixels fails.
    return data[: max(int(len(data) * (0.55 if f.format == "jpg" else 0.35)), 120)]


def _clip_frames(f: SynthFile, cfg: SynthConfig, beats_per_s: float) -> list[np.ndarray]:
    rng = _file_rng(cfg, f)
    shot = Shot(f.scene, f.height, f.width, rng, rgb=(f.mode == "RGB"), ecg=catalog.source(f.source).ecg)
    motion = np.random.default_rng(int(rng.integers(0, 2**63)))
    frames = []
    for t in range(f.frames):
        if t:
            shot.speckle.advance(motion, correlation=0.85)  # scatterers move between frames
        frames.append(shot.frame(phase=t * beats_per_s / cfg.video_fps).pixels)
    return frames


def _write_mask(root: Path, f: SynthFile, image_mask: np.ndarray) -> None:
    small = cv2.resize(image_mask, (f.width, f.height), interpolation=cv2.INTER_NEAREST)
    atomic_write_bytes(root / f.path, encode_image(small, "png", 0))


# ----------------------------------------------------------------------------- outputs
def _mapping_entries(files: list[SynthFile], root: Path) -> list[dict]:
    used = {f.source for f in files if f.kind in ("image", "video", "dicom")}
    entries = []
    for src in SOURCES:
        if src.name not in used:
            continue
        entry = {"name": src.name, "root": src.root, "labels": list(src.labels), "device": src.device}
        if src.frame_stride:
            entry["frame_stride"] = src.frame_stride
        if src.rules:
            entry["rules"] = [{"glob": g, "labels": list(labels)} for g, labels in src.rules]
        if src.csv and (root / src.root / src.csv).exists():
            entry["csv"] = src.csv
        entries.append(entry)
    return entries


def _csv_rows(files: list[SynthFile], src: SourceSpec) -> list[tuple[str, str]]:
    rows = []
    for f in files:
        if f.source != src.name or f.kind not in ("image", "video", "dicom"):
            continue
        rel = str(PurePosixPath(f.path).relative_to(src.root))
        if any(rel.startswith(folder + "/") for folder in src.csv_folders):
            rows.append((rel, ";".join(f.labels)))
    return rows


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "labels"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


_README = """SYNTHETIC ULTRASOUND DATA - NOT REAL PATIENT IMAGES
====================================================

Generated by `echocare synth` (echocare_dist.synth) with seed {seed}. Every image is simulated:
speckle, probe footprints, attenuation, organ shapes and the burned-in text are all computed.
Use it to test the pipeline (shard builder, loaders, training, fine-tuning), never to train or
evaluate a model meant for real ultrasound.

Contents: {summary}

- {mapping}: the label mapping the shard builder reads (sources, default labels, glob rules,
  per-file CSV, one unlabeled source).
- {manifest}: per-file ground truth: labels, role (regular / near_empty / duplicate /
  near_duplicate / corrupt), the original of each duplicate, the sector box, frames, masks.
- Breast US/masks: lesion masks (0/255 PNG) at a different size than their images.
- Corrupt files are intentional (truncated JPEG / PNG, garbage bytes), to exercise rejection.
"""


def _prepare_dir(out_dir: Path) -> None:
    """Create out_dir, or wipe a previous synthetic set there; never touch a folder we do not own."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"synth output {out_dir} exists and is not a folder")
        entries = list(out_dir.iterdir())
        if entries and not (out_dir / MARKER).exists():
            raise FileExistsError(f"synth output {out_dir} is not empty and was not made by `echocare synth` "
                                  f"(no {MARKER} file); choose an empty or new folder")
        for e in entries:
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / MARKER, "written by echocare_dist.synth; the folder is wiped on re-generation\n")


def check_ontology(ontology: Ontology) -> None:
    missing = sorted(n for n in catalog.all_label_names() if n not in ontology.index)
    if missing:
        raise OntologyError(f"the synthetic dataset labels images with node(s) {', '.join(map(repr, missing))} "
                            f"that ontology {ontology.title!r} does not have")


def generate_dataset(out_dir: Path, cfg: SynthConfig, ontology: Ontology) -> SynthResult:
    """Write the synthetic collection into out_dir (created; a previous synthetic set there is replaced)."""
    out_dir = Path(out_dir)
    check_ontology(ontology)
    files = plan_dataset(cfg)
    _prepare_dir(out_dir)
    by_path = {f.path: f for f in files}
    needed = {f.of for f in files if f.role in ("duplicate", "near_duplicate")}
    kept: dict[str, tuple[np.ndarray, bytes]] = {}  # originals of duplicates: pixels and bytes

    for f in files:
        dst = out_dir / f.path
        if f.kind == "image" and f.role == "regular":
            pixels, frame = _render_still(f, cfg, with_mask=bool(f.mask))
            data = encode_image(pixels, f.format, cfg.jpeg_quality)
            atomic_write_bytes(dst, data)
            f.sector_box = list(frame.sector_box)
            if f.mask:
                _write_mask(out_dir, by_path[f.mask], frame.mask)
            if f.path in needed:
                kept[f.path] = (pixels, data)
        elif f.role == "duplicate":
            pixels, data = kept[f.of]
            if f.variant != "byte_copy":  # same pixels, other bytes
                data = encode_image(pixels, f.format, cfg.jpeg_quality, png_level=9)
            atomic_write_bytes(dst, data)
            f.sector_box = by_path[f.of].sector_box
        elif f.role == "near_duplicate":
            pixels = _near_duplicate(kept[f.of][0], f.variant, _file_rng(cfg, f))
            atomic_write_bytes(dst, encode_image(pixels, "png", cfg.jpeg_quality))
            f.sector_box = by_path[f.of].sector_box
        elif f.role == "near_empty":
            atomic_write_bytes(dst, encode_image(_near_empty(f, cfg), f.format, cfg.jpeg_quality))
        elif f.role == "corrupt":
            atomic_write_bytes(dst, _corrupt(f, cfg))
        elif f.kind == "video":
            bps = next(v[5] for v in catalog.VIDEOS if v[3] == f.scene)
            write_video(dst, _clip_frames(f, cfg, bps), cfg.video_fps)
        elif f.kind == "dicom":
            rng = _file_rng(cfg, f)
            date = f"20{int(rng.integers(15, 25))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            if f.frames > 1:
                frames = np.stack(_clip_frames(f, cfg, catalog.DICOM_CINE[4]))
            else:
                frames = _render_still(f, cfg)[0]
            atomic_write_bytes(dst, encode_dicom(frames, uid_seed=f"{cfg.seed}/{f.path}",
                                                 frame_time_ms=1000.0 / cfg.video_fps, study_date=date,
                                                 description=f"synthetic {f.scene}"))

    for src in SOURCES:
        rows = _csv_rows(files, src) if src.csv else []
        if rows:
            _write_csv(out_dir / src.root / src.csv, rows)
            files.append(SynthFile(str(PurePosixPath(src.root, src.csv)), src.name, "csv", role="labels",
                                   format="csv"))
    mapping = out_dir / MAPPING_NAME
    header = ("# Label mapping of the synthetic ultrasound collection (echocare synth). Paths are relative\n"
              "# to this file; see echocare_dist/curation/mapping.py for the semantics.\n")
    atomic_write_text(mapping, header + yaml.safe_dump({"sources": _mapping_entries(files, out_dir)},
                                                       sort_keys=False, default_flow_style=None, width=100))
    count = lambda kind, role=None: sum(1 for f in files if f.kind == kind and (role is None or f.role == role))  # noqa: E731
    result = SynthResult(
        root=out_dir, mapping=mapping, manifest=out_dir / MANIFEST_NAME,
        images=count("image"), videos=count("video"), dicoms=count("dicom"),
        near_empty=count("image", "near_empty"), duplicates=count("image", "duplicate"),
        near_duplicates=count("image", "near_duplicate"), corrupt=count("image", "corrupt"),
        masks=count("mask"), files=tuple(files))
    counts = {k: getattr(result, k) for k in ("images", "videos", "dicoms", "near_empty", "duplicates",
                                              "near_duplicates", "corrupt", "masks")}
    atomic_write_json(result.manifest, {
        "generator": "echocare_dist.synth", "synthetic": True, "seed": cfg.seed,
        "synth_config": dataclasses.asdict(cfg), "ontology": ontology.title, "ontology_hash": ontology.hash,
        "counts": counts,
        "files": [{k: v for k, v in dataclasses.asdict(f).items() if k != "index" and v not in ("", None)}
                  for f in files]})
    atomic_write_text(out_dir / README_NAME, _README.format(seed=cfg.seed, summary=result.counts(),
                                                            mapping=MAPPING_NAME, manifest=MANIFEST_NAME))
    return result
