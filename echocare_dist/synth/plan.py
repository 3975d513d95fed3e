"""The plan of a synthetic collection: every file to write, with its ground truth (`SynthFile`),
as a pure function of the synth config.

Regular images are spread over the catalog's (source, folder) variants by weight, then the
special cases (duplicates and near-duplicates of chosen originals, near-empty frames, corrupt
files), clips and DICOM. One RNG stream, `default_rng([seed, 1])`, decides everything, so the
same seed always plans the same files."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from ..config import ConfigError, SynthConfig
from . import catalog
from .catalog import SOURCES, SourceSpec
from .scenes import SCENES

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
