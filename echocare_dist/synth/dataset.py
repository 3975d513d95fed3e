"""`generate_dataset`: plan the synthetic collection, render and write every file, then the
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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import yaml

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..config import ConfigError, SynthConfig
from ..ontology import Ontology, OntologyError
from . import catalog
from .catalog import SOURCES, SourceSpec
from .scanner import Shot
from .scenes import SCENES
from .writers import encode_dicom, encode_image, write_video

MARKER = ".echocare-synth"       # marks a folder this generator owns (and may wipe on re-run)
MAPPING_NAME = "labels.yaml"
MANIFEST_NAME = "synth_manifest.json"
README_NAME = "README.txt"
_MASK_SCALES = (0.5, 0.625, 0.75)


@dataclass
class SynthFile:
    """One written file and its ground truth."""
    path: str                         # relative to the dataset folder, posix
    source: str
    kind: str                         # image | video | dicom | mask | csv
    role: str = "regular"             # regular | near_empty | duplicate | near_duplicate | corrupt | mask
    labels: list = field(default_factory=list)  # what the mapping gives this file (node names)
    scene: str = ""
    format: str = ""                  # png | jpg | bmp | mp4 | avi | dcm
    mode: str = ""                    # L | RGB | I;16
    width: int = 0
    height: int = 0
    frames: int = 1
    sector_box: list | None = None    # [x0, y0, x1, y1) of the imaged footprint (regular images, frame 0)
    of: str = ""                      # duplicate / near-duplicate: the original; mask: its image
    mask: str = ""                    # image: its segmentation mask
    variant: str = ""                 # which special case
    index: int = -1                   # RNG stream of the file


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


# ----------------------------------------------------------------------------- planning
def _special_count(fraction: float, n_images: int, n_variants: int) -> int:
    return 0 if fraction <= 0 or n_images == 0 else max(n_variants, int(round(fraction * n_images)))


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Split `total` by weights, at least one each while possible (largest remainder)."""
    n = len(weights)
    if total <= n:
        return [1] * total + [0] * (n - total)
    w = np.asarray(weights, np.float64) / sum(weights)
    share = (total - n) * w
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: total - n - counts.sum()]] += 1
    return (counts + 1).tolist()


def _rel(source: SourceSpec, folder: str, name: str) -> str:
    return str(PurePosixPath(source.root, folder, name))  # empty parts are dropped


def _folder_of(path: str, source: SourceSpec) -> str:
    rel = str(PurePosixPath(path).parent.relative_to(source.root))
    return "" if rel == "." else rel


def _random_size(rng: np.random.Generator, cfg: SynthConfig, multiple: int = 1) -> tuple[int, int]:
    """(height, width) in [min_size, max_size], not square (real frames rarely are)."""
    lo = -(-cfg.min_size // multiple) * multiple
    hi = max(cfg.max_size // multiple * multiple, lo)
    for _ in range(16):
        h, w = (int(v) // multiple * multiple for v in rng.integers(lo, hi + 1, size=2))
        h, w = max(h, lo), max(w, lo)
        if h != w or lo == hi:
            return h, w
    return h, (w + multiple if w + multiple <= hi else w - multiple)


class _Plan:
    def __init__(self, cfg: SynthConfig):
        self.files: list[SynthFile] = []
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.counters: dict[tuple[str, str, str], int] = {}

    def add(self, f: SynthFile) -> SynthFile:
        f.index = len(self.files)
        self.files.append(f)
        return f

    def next_n(self, source: str, folder: str, stem: str) -> int:
        key = (source, folder, stem)
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key]

    def name(self, source: SourceSpec, folder: str, pattern: str, ext: str = "") -> str:
        """A fresh path from `pattern` ({n} counts per source, folder and stem, whatever the extension)."""
        if not ext:
            pattern, _, ext = pattern.rpartition(".")
        n = self.next_n(source.name, folder, pattern)
        return _rel(source, folder, f"{pattern.format(n=n)}.{ext}")


def plan_dataset(cfg: SynthConfig) -> list[SynthFile]:
    """Every file to write, with its ground truth; pure function of the config."""
    n_near_empty = _special_count(cfg.near_empty_fraction, cfg.num_images, len(catalog.NEAR_EMPTY))
    n_dup = _special_count(cfg.duplicate_fraction, cfg.num_images, len(catalog.DUPLICATES))
    n_near_dup = _special_count(cfg.near_duplicate_fraction, cfg.num_images, len(catalog.NEAR_DUPLICATES))
    n_corrupt = _special_count(cfg.corrupt_fraction, cfg.num_images, len(catalog.CORRUPT))
    n_regular = cfg.num_images - n_near_empty - n_dup - n_near_dup - n_corrupt
    needs_original = n_dup + n_near_dup
    if cfg.num_images and n_regular < max(1, needs_original):
        raise ConfigError(
            f"synth.num_images={cfg.num_images} is too small: its special cases ({n_near_empty} near-empty, "
            f"{n_dup} duplicates, {n_near_dup} near-duplicates, {n_corrupt} corrupt) leave {n_regular} regular "
            f"images, and the (near-)duplicates need {max(1, needs_original)} originals; raise it or set the "
            f"synth.*_fraction values to 0")
    plan = _Plan(cfg)
    rng = plan.rng
    all_scenes = sorted(SCENES)

    # Regular images, spread over the (source, folder) variants.
    slots = [(s, v) for s in SOURCES for v in s.variants]
    counts = _allocate(n_regular, [s.weight * v.weight for s, v in slots])
    format_turn = {s.name: 0 for s in SOURCES}
    regular: list[SynthFile] = []
    for (src, var), count in zip(slots, counts):
        for i in range(count):
            scene = var.scenes[i % len(var.scenes)] if var.scenes else all_scenes[int(rng.integers(len(all_scenes)))]
            fmt, mode = src.formats[format_turn[src.name] % len(src.formats)].split(":")
            format_turn[src.name] += 1
            h, w = _random_size(rng, cfg)
            labels = var.labels if var.labels is not None else catalog.CSV_SCENE_LABELS[scene]
            f = plan.add(SynthFile(plan.name(src, var.folder, var.stem, fmt), src.name, "image",
                                   labels=list(labels), scene=scene, format=fmt, mode=mode, width=w, height=h))
            regular.append(f)
            if src.masks:  # a sibling folder, outside the source root, at another size than the image
                mh, mw = h, w
                while (mh, mw) == (h, w):
                    scale = _MASK_SCALES[int(rng.integers(len(_MASK_SCALES)))]
                    mh, mw = max(int(round(h * scale)), 8), max(int(round(w * scale)), 8)
                f.mask = str(PurePosixPath(src.masks, var.folder, f"{PurePosixPath(f.path).stem}_mask.png"))
                plan.add(SynthFile(f.mask, src.name, "mask", role="mask", format="png", mode="L",
                                   width=mw, height=mh, of=f.path))

    # Originals of (near-)duplicates: distinct regular images outside CSV-labeled sources and
    # without masks, so a copy next to its original gets the same labels from the rules.
    candidates = [f for f in regular if not catalog.source(f.source).csv and not f.mask]
    if len(candidates) < needs_original:
        raise ConfigError(f"synth.num_images={cfg.num_images} gives {len(candidates)} images to copy from but "
                          f"{needs_original} (near-)duplicates; raise it or lower synth.duplicate_fraction / "
                          f"synth.near_duplicate_fraction")
    originals = [candidates[i] for i in rng.permutation(len(candidates))[:needs_original]]
    for k, orig in enumerate(originals):
        # PNG re-saves, BMP exports and near duplicates start from lossless 8-bit pixels.
        lossless = k >= n_dup or catalog.DUPLICATES[k % len(catalog.DUPLICATES)] != "byte_copy"
        if lossless and (orig.format != "png" or orig.mode == "I;16"):
            orig.format, orig.mode = "png", ("L" if orig.mode == "I;16" else orig.mode)
            orig.path = str(PurePosixPath(orig.path).with_suffix(".png"))
    for k in range(n_dup):
        variant = catalog.DUPLICATES[k % len(catalog.DUPLICATES)]
        orig = originals[k]
        src = catalog.source(orig.source)
        stem = PurePosixPath(orig.path).stem
        if variant == "byte_copy":  # into the unlabeled dump, as when one public set re-hosts another's
            dst = catalog.source(catalog.COPIES_FOLDER[0])
            path = _rel(dst, catalog.COPIES_FOLDER[1], f"copy of {PurePosixPath(orig.path).name}")
            source_name, labels, fmt = dst.name, list(dst.labels), orig.format
        else:
            fmt = "png" if variant == "png_resave" else "bmp"
            path = _rel(src, _folder_of(orig.path, src), f"{stem} (1).png" if fmt == "png" else f"{stem} export.bmp")
            source_name, labels = src.name, list(orig.labels)
        plan.add(SynthFile(path, source_name, "image", role="duplicate", labels=labels, scene=orig.scene,
                           format=fmt, mode=orig.mode, width=orig.width, height=orig.height, of=orig.path,
                           variant=variant))
    for k in range(n_near_dup):
        variant = catalog.NEAR_DUPLICATES[k % len(catalog.NEAR_DUPLICATES)]
        orig = originals[n_dup + k]
        path = str(PurePosixPath(orig.path).with_name(f"{PurePosixPath(orig.path).stem} (2).png"))
        plan.add(SynthFile(path, orig.source, "image", role="near_duplicate", labels=list(orig.labels),
                           scene=orig.scene, format="png", mode=orig.mode, width=orig.width, height=orig.height,
                           of=orig.path, variant=variant))
    for k in range(n_near_empty):
        variant, src_name, folder, pattern = catalog.NEAR_EMPTY[k % len(catalog.NEAR_EMPTY)]
        src = catalog.source(src_name)
        h, w = _random_size(rng, cfg)
        path = plan.name(src, folder, pattern)
        plan.add(SynthFile(path, src.name, "image", role="near_empty", labels=list(catalog.folder_labels(src, folder)),
                           format=PurePosixPath(path).suffix[1:], mode="L", width=w, height=h, variant=variant))
    for k in range(n_corrupt):
        variant, src_name, folder, pattern, scene = catalog.CORRUPT[k % len(catalog.CORRUPT)]
        src = catalog.source(src_name)
        path = plan.name(src, folder, pattern)
        plan.add(SynthFile(path, src.name, "image", role="corrupt", labels=list(catalog.folder_labels(src, folder)),
                           scene=scene, format=PurePosixPath(path).suffix[1:], mode="L",
                           width=cfg.min_size, height=cfg.min_size + 8, variant=variant))

    # Clips and DICOM.
    for k in range(cfg.num_videos):
        src_name, folder, pattern, scene, rgb, _ = catalog.VIDEOS[k % len(catalog.VIDEOS)]
        src = catalog.source(src_name)
        h, w = _random_size(rng, cfg, multiple=8)
        path = plan.name(src, folder, pattern)
        plan.add(SynthFile(path, src.name, "video", labels=list(catalog.folder_labels(src, folder)), scene=scene,
                           format=PurePosixPath(path).suffix[1:], mode="RGB" if rgb else "L", width=w, height=h,
                           frames=cfg.video_frames))
    for k in range(cfg.num_dicom + cfg.num_dicom_single):
        cine = k < cfg.num_dicom
        src_name, folder, pattern, scene = (catalog.DICOM_CINE[:4] if cine else catalog.DICOM_SINGLE)
        src = catalog.source(src_name)
        h, w = _random_size(rng, cfg)
        path = plan.name(src, folder, pattern)
        plan.add(SynthFile(path, src.name, "dicom", labels=list(catalog.folder_labels(src, folder)), scene=scene,
                           format="dcm", mode="L" if cine else "RGB", width=w, height=h,
                           frames=cfg.dicom_frames if cine else 1))
    paths = [f.path for f in plan.files]
    if len(paths) != len(set(paths)):
        raise RuntimeError("synth plan produced the same path twice: "
                           f"{sorted(p for p in set(paths) if paths.count(p) > 1)}")
    return plan.files


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
