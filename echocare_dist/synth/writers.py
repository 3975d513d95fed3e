"""Encoders for the synthetic files: still images, video clips, DICOM. All writes are atomic.

Encoders are byte-deterministic for the same pixels (PIL for PNG/JPEG/BMP, OpenCV's FFmpeg
backend for mp4v / MJPG, pydicom with fixed UIDs and dates), so one seed gives the same bytes.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..atomic import atomic_write_bytes

# container -> FourCC that OpenCV's FFmpeg backend can write here (avc1/H.264 usually cannot).
VIDEO_CODECS = {"mp4": "mp4v", "avi": "MJPG"}


def encode_image(pixels: np.ndarray, fmt: str, jpeg_quality: int, png_level: int = 1) -> bytes:
    """pixels: (H, W) uint8, (H, W, 3) uint8 RGB or (H, W) uint16 (16-bit PNG only)."""
    if pixels.dtype == np.uint16 and fmt != "png":
        raise ValueError(f"16-bit pixels can only be written as PNG, not {fmt!r}")
    img = Image.fromarray(pixels)  # uint16 -> mode I;16
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png_level)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    elif fmt == "bmp":
        img.save(buf, format="BMP")
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected png, jpg or bmp")
    return buf.getvalue()


def write_image(path: Path, pixels: np.ndarray, fmt: str, jpeg_quality: int, png_level: int = 1) -> bytes:
    data = encode_image(pixels, fmt, jpeg_quality, png_level)
    atomic_write_bytes(path, data)
    return data


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Encode (H, W) or (H, W, 3) RGB uint8 frames; the container follows the suffix (.mp4 / .avi).

    OpenCV writes to a path, not a buffer: encode into a private temp dir next to the target,
    then publish atomically, so a crash never leaves a half-written clip under a real name."""
    container = path.suffix.lower().lstrip(".")
    if container not in VIDEO_CODECS:
        raise ValueError(f"{path}: unsupported video container {container!r}; expected {sorted(VIDEO_CODECS)}")
    h, w = frames[0].shape[:2]
    color = frames[0].ndim == 3
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".synth-video-", dir=path.parent)
    try:
        tmp = os.path.join(tmp_dir, f"clip.{container}")
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*VIDEO_CODECS[container]), fps, (w, h), color)
        if not writer.isOpened():
            raise RuntimeError(f"{path}: OpenCV cannot open a {VIDEO_CODECS[container]} writer for .{container}")
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR) if color else f)
        writer.release()
        atomic_write_bytes(path, Path(tmp).read_bytes())
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# DICOM SOP classes of ultrasound images.
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs


def encode_dicom(frames: np.ndarray, *, uid_seed: str, frame_time_ms: float, study_date: str,
                 description: str) -> bytes:
    """frames: (N, H, W) uint8 gray or (H, W, 3) uint8 RGB (single frame). Raw explicit VR LE."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    rgb = frames.ndim == 3 and frames.shape[-1] == 3
    multi = not rgb and frames.ndim == 3 and frames.shape[0] > 1
    sop_class = US_MULTIFRAME_STORAGE if multi else US_IMAGE_STORAGE
    uid = lambda what: generate_uid(prefix=_UID_ROOT, entropy_srcs=[uid_seed, what])  # noqa: E731

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "US"
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = "SYN" + uid_seed[-6:].replace(".", "0")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.ContentTime = "120000"
    ds.Manufacturer = "echocare-dist synthetic"
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    if rgb:
        ds.Rows, ds.Columns = frames.shape[:2]
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        if frames.ndim == 2:
            frames = frames[None]
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    if multi:
        ds.NumberOfFrames = frames.shape[0]
        ds.FrameTime = f"{frame_time_ms:.1f}"
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
        ds.CineRate = int(round(1000.0 / frame_time_ms))
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
