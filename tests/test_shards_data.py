"""Small hand-made ultrasound-like source folders for the shard builder tests (no test here).
The frames are echocare_dist.synth.patterns.sector_frame; this file only arranges them into files.

Everything real collections throw at the builder, in a few dozen files: PNG/JPEG/BMP/TIFF of
several sizes, RGB, gray, palette and 16-bit, names with spaces, burned-in text around the
sector, a near-empty frame, an exact duplicate under another name, a truncated JPEG, garbage
bytes named .png, an mp4, a multi-frame DICOM and an extensionless DICOM, a per-file CSV.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from echocare_dist.config import load_config
from echocare_dist.synth.patterns import TEXT, sector_frame

# deid off: these tests check the original paths in the manifest (test_curation_deid.py: deid on)
OVERRIDES = ["curation.shard_max_samples=8", "curation.chunk_files=4", "curation.deid=false"]


def curation_config(**kw):
    """tiny_cpu with the shard builder tests' overrides and `curation.<k>=<v>` for each keyword."""
    return load_config("tiny_cpu", OVERRIDES + [f"curation.{k}={v}" for k, v in kw.items()])


def to_rgb(gray: np.ndarray, tint=(1.0, 0.95, 0.9)) -> np.ndarray:
    return np.clip(gray[..., None] * np.asarray(tint)[None, None], 0, 255).astype(np.uint8)


def write_dicom(path: Path, frames: np.ndarray, rgb: bool = False, preamble: bool = True) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US multi-frame image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    n, h, w = frames.shape[:3]
    ds.Rows, ds.Columns = h, w
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


@dataclass
class Dataset:
    mapping: Path
    root: Path
    expect: dict = field(default_factory=dict)


def make_dataset(base: Path) -> Dataset:
    """Two sources with rules and a CSV. `expect` holds what a correct build must report."""
    thy = base / "Thyroid US"
    (thy / "nodules").mkdir(parents=True)
    (thy / "scans day 1").mkdir(parents=True)
    card = base / "cardiac clips"
    card.mkdir(parents=True)
    sizes = [(160, 200), (240, 320), (360, 480), (300, 260), (480, 640)]
    # stills: gray png, RGB jpeg, bmp, tiff, palette png, 16-bit png
    for i, (h, w) in enumerate(sizes):
        img, _ = sector_frame(h, w, seed=i)
        cv2.imwrite(str(thy / "scans day 1" / f"img {i}.png"), img)
    for i, (h, w) in enumerate(sizes[:3]):
        img, _ = sector_frame(h, w, seed=10 + i)
        Image.fromarray(to_rgb(img)).save(thy / "nodules" / f"nodule {i}.jpg", quality=92)
    img, _ = sector_frame(200, 260, seed=20)
    Image.fromarray(img).save(thy / "scan bmp.bmp")
    img, _ = sector_frame(220, 300, seed=21)
    Image.fromarray(to_rgb(img)).save(thy / "scan tiff.tiff")
    img, _ = sector_frame(210, 280, seed=22)
    Image.fromarray(to_rgb(img)).convert("P", palette=Image.ADAPTIVE, colors=64).save(thy / "palette scan.png")
    img, _ = sector_frame(230, 290, seed=23)
    Image.fromarray((img.astype(np.uint16) * 16)).save(thy / "deep 16bit.png")  # 12-bit data in 16 bits
    img, _ = sector_frame(190, 250, seed=24)
    Image.fromarray(np.dstack([to_rgb(img), np.full(img.shape, 255, np.uint8)])).save(thy / "rgba scan.png")
    # rejections
    shutil.copy(thy / "scans day 1" / "img 1.png", thy / "scans day 1" / "img 1 copy.png")  # duplicate
    dark = np.zeros((200, 260), np.uint8)
    cv2.putText(dark, "NO SIGNAL", (20, 100), cv2.FONT_HERSHEY_SIMPLEX, 0.4, TEXT, 1)
    cv2.imwrite(str(thy / "empty frame.png"), dark)                        # too_few_pixels
    good = (thy / "nodules" / "nodule 0.jpg").read_bytes()
    (thy / "nodules" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG -> corrupt
    (thy / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)  # corrupt
    (thy / "notes.txt").write_text("not an image\n")                      # ignored
    (thy / ".DS_Store").write_bytes(b"\0\1\2")                            # hidden: ignored
    (thy / "labels.csv").write_text("path,labels\nscans day 1/img 0.png,thyroid_lobe;thyroid_isthmus\n"
                                    "scan bmp.bmp,\n")
    # cardiac: an mp4 (25 frames, stride 10 -> 3 kept), a DICOM cine (12 frames, stride 5 -> 3),
    # an extensionless single-frame RGB DICOM.
    vw = cv2.VideoWriter(str(card / "apical 4ch.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (320, 240))
    for t in range(25):
        frame, _ = sector_frame(240, 320, seed=100 + t)
        vw.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    vw.release()
    cine = np.stack([sector_frame(200, 240, seed=200 + t)[0] for t in range(12)])
    write_dicom(card / "cine loop.dcm", cine)
    single = to_rgb(sector_frame(180, 220, seed=300)[0])[None]
    write_dicom(card / "IM0001", single, rgb=True)
    (card / "broken clip.mp4").write_bytes(bytes(range(256)) * 8)                # corrupt video
    cine_bytes = (card / "cine loop.dcm").read_bytes()
    (card / "cut cine.dcm").write_bytes(cine_bytes[: len(cine_bytes) // 3])     # truncated DICOM

    mapping = base / "mapping.yaml"
    mapping.write_text(
        "sources:\n"
        '  - name: "Thyroid US"\n'
        '    root: "Thyroid US"\n'
        "    labels: [thyroid]\n"
        '    device: "synthetic linear"\n'
        "    rules:\n"
        '      - glob: "nodules/*"\n'
        "        labels: [thyroid_nodule]\n"
        '    csv: "labels.csv"\n'
        '  - name: "Cardiac clips"\n'
        '    root: "cardiac clips"\n'
        "    labels: [heart]\n"
        "    frame_stride: 5\n"
        "    rules:\n"
        '      - glob: "*.mp4"\n'
        "        labels: [left_ventricle]\n")
    expect = {
        "samples": 13 + 9,
        "corrupt": {str(thy / "nodules" / "broken.jpg"), str(thy / "garbage.png"),
                    str(card / "broken clip.mp4"), str(card / "cut cine.dcm")},
        "too_few_pixels": {str(thy / "empty frame.png")},
        # "img 1 copy.png" sorts before "img 1.png" (' ' < '.'): the copy is kept, the original dropped
        # the cut cine's frame 0 still decodes: a duplicate of the full cine's frame 0
        "duplicate": {str(thy / "scans day 1" / "img 1.png"), str(card / "cut cine.dcm")},
        "duplicate_of": str(thy / "scans day 1" / "img 1 copy.png"),
        # 13 stills; the source's stride 5 keeps mp4 frames 0,5,10,15,20 and cine frames 0,5,10
        "per_source": {"Thyroid US": 13, "Cardiac clips": 5 + 3 + 1},
        "mp4_frames": [0, 5, 10, 15, 20],
        "dicom_frames": [0, 5, 10],
    }
    return Dataset(mapping, base, expect)
