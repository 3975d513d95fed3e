"""Finding and decoding source media: still images, videos and DICOM (single frame or cine).

Every decoder yields `(frame_index, gray)` with `gray` a 2-D uint8 array, so the rest of the
pipeline never sees colour, alpha, palettes or 16-bit data. Videos and multi-frame files keep
every `stride`-th frame (0, stride, 2*stride, ...).

What a decoder raises instead of yielding (stage.py records it under its reason):
- Rejected("too_large") before any decoding, when the header's width x height exceeds
  `max_pixels` (curation.max_pixels): the cost of a decode grows with the pixels, not the file size;
- Rejected("truncated_video") after the last frame, when a video ends before the frame count its
  header states (a copy cut off halfway): the frames decoded so far are kept;
- Rejected("unsupported_codec") before any decoding, when a DICOM's transfer syntax has no decoder
  here (dicom_codecs.py; the `dicom` extra adds JPEG Lossless / JPEG-LS / JPEG 2000).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .dicom_codecs import check_decodable
from .preprocess import Rejected

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov"})
DICOM_EXTS = frozenset({".dcm", ".dicom"})
DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class MediaFile:
    path: Path          # absolute
    relpath: str        # posix, relative to the source root
    kind: str           # "image" | "video" | "dicom"
    size: int
    mtime_ns: int


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def media_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in DICOM_EXTS:
        return "dicom"
    if ext == "" and _is_dicom(path):
        return "dicom"
    return None


def discover(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[MediaFile], list[str]]:
    """Media files under `root` in a stable (sorted) order, and the paths that were skipped.

    Hidden entries (".DS_Store", macOS "._x.jpg" resource forks, ".staging") are skipped: they are
    never ultrasound data and the resource forks would otherwise all count as corrupt images."""
    files: list[MediaFile] = []
    skipped: list[str] = []
    excluded = {os.path.realpath(p) for p in exclude}
    visited: set[str] = set()  # real paths: a symlink loop is walked once

    def walk(folder: str, rel: str) -> None:
        real = os.path.realpath(folder)
        if real in visited or real in excluded:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(f"{folder} ({exc.strerror})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relpath = f"{rel}{entry.name}"
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path, relpath + "/")
                continue
            kind = media_kind(entry.path)
            if kind is None:
                skipped.append(entry.path)
                continue
            try:
                st = entry.stat()
            except OSError:
                st = None
            files.append(MediaFile(Path(entry.path), relpath, kind,
                                   st.st_size if st else -1, st.st_mtime_ns if st else -1))

    walk(str(root), "")
    return files, skipped


# ---------------------------------------------------------------------------------------------
# pixel conversions
# ---------------------------------------------------------------------------------------------
def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any integer/float image into uint8, keeping 0 at 0 (black stays background)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    lo, hi = min(float(a.min()), 0.0), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = min(float(a.min()), 0.0), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_gray(arr: np.ndarray, order: str = "RGB") -> np.ndarray:
    """(H, W), (H, W, 1|3|4) of any depth -> (H, W) uint8. `order` is the channel order of colour input."""
    arr = to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3:
        raise ValueError(f"unsupported image shape {arr.shape}")
    channels = arr.shape[2]
    if channels == 1:
        return arr[:, :, 0]
    if channels == 2:  # gray + alpha
        return arr[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY if order == "RGB" else cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_RGBA2GRAY if order == "RGB" else cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"unsupported channel count {channels}")


# ---------------------------------------------------------------------------------------------
# decoders
# ---------------------------------------------------------------------------------------------
_PIL_DIRECT_TO_L = {"L", "1", "P", "PA", "RGB", "RGBA", "RGBX", "LA", "La", "RGBa"}


def _pil_frame_to_gray(im) -> np.ndarray:
    if im.mode == "L":
        return np.asarray(im)
    if im.mode in _PIL_DIRECT_TO_L:
        return np.asarray(im.convert("L"))
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer and float images
        return to_gray(np.asarray(im))
    return np.asarray(im.convert("RGB").convert("L"))  # CMYK, YCbCr, LAB, HSV


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Rejected("too_large") when a frame of width x height exceeds the cap (0 = no cap)."""
    if max_pixels and width * height > max_pixels:
        raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > curation.max_pixels={max_pixels} "
                                    f"(checked from the header, not decoded)")


def iter_image(path: Path, stride: int, max_pixels: int = 0) -> Iterator[tuple[int | None, np.ndarray]]:
    """Still images through PIL: unlike cv2.imdecode it raises on truncated files instead of
    returning a half-grey picture. Multi-page TIFFs are treated like cine loops. Image.open reads
    only the header: the size is checked before any pixel is decoded."""
    from PIL import Image
    with Image.open(path) as im:
        check_pixels(*im.size, max_pixels)
        n = getattr(im, "n_frames", 1)
        if n <= 1:
            im.load()
            yield None, _pil_frame_to_gray(im)
            return
        for i in range(0, n, stride):
            im.seek(i)
            im.load()
            yield i, _pil_frame_to_gray(im)


def iter_video(path: Path, stride: int, max_pixels: int = 0) -> Iterator[tuple[int | None, np.ndarray]]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError("cannot open video (unknown codec or not a video)")
        check_pixels(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), max_pixels)
        # The container's own frame count (AVI/MP4 headers state it exactly); <= 0 when unknown.
        expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        index, yielded = 0, 0
        while cap.grab():  # grab() skips the colour conversion of frames we drop
            if index % stride == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise ValueError(f"frame {index} cannot be decoded")
                yielded += 1
                yield index, to_gray(frame, order="BGR")
            index += 1
        if yielded == 0:
            raise ValueError("no decodable frame")
        if expected > 0 and index < expected:
            raise Rejected("truncated_video", f"{index} of the {expected} frames its header states could be read "
                                              f"(file cut short?); the {yielded} frames kept are from those")
    finally:
        cap.release()


def _dicom_frame_to_gray(frame: np.ndarray, ds) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        frame = apply_color_lut(frame, ds)
    gray = to_gray(frame)
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        gray = 255 - gray
    return gray


def iter_dicom(path: Path, stride: int, max_pixels: int = 0) -> Iterator[tuple[int | None, np.ndarray]]:
    """Frames one at a time (pydicom.pixels.iter_pixels), so a long cine never sits in memory whole.
    YBR colour data arrives as RGB (pydicom's default)."""
    import pydicom
    from pydicom.pixels import iter_pixels
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("DICOM without image pixel data (Rows/Columns missing)")
    check_pixels(int(ds.Columns), int(ds.Rows), max_pixels)
    check_decodable(ds)  # Rejected("unsupported_codec"), not "corrupt", when no plugin decodes it
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    indices = range(0, frames, stride)
    for i, frame in zip(indices, iter_pixels(str(path), indices=indices)):
        yield (i if frames > 1 else None), _dicom_frame_to_gray(frame, ds)


DECODERS = {"image": iter_image, "video": iter_video, "dicom": iter_dicom}


def iter_frames(path: Path, kind: str, stride: int, max_pixels: int = 0) -> Iterator[tuple[int | None, np.ndarray]]:
    """(frame index or None for a still image, uint8 gray) for every kept frame of one file; see
    the module doc for what it raises instead."""
    return DECODERS[kind](path, stride, max_pixels)
