"""Stage 1 of a build: decode and curate source files in parallel, spilling the results to disk.

Work is cut into chunks of `curation.chunk_files` consecutive files. A worker turns one chunk
into two files in the staging folder: `.bin`, the concatenated sample payloads (JPEG, label
bytes, provenance JSON), and `.json`, the small per-sample metadata (key, perceptual hash,
offsets) and per-file rejections. Both are written atomically, metadata last, so a chunk whose
metadata exists is complete; its name carries a digest of everything that determines its
content (paths, sizes, mtimes, labels, curation parameters, ontology), so a rerun reuses exactly
the chunks that are still valid and nothing stale.

Why spill instead of keeping results in memory: at millions of images the encoded JPEGs alone
are hundreds of GB. The main process only ever holds ~50 bytes of metadata per sample (keys and
hashes for deduplication, offsets for the shard writer), and workers return nothing but a count,
so no pixels cross a pipe. Cost: the staging area needs about as much disk as the shards.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from ..atomic import atomic_open, atomic_write_json
from ..shardfmt import CHECKSUM_KEY, jpg_checksum
from .deid import dicom_metadata, salt_id, sample_key
from .media import iter_frames
from .preprocess import FrameParams, Rejected, curate_frame
from .screen import check_mask_content

STAGE_FORMAT = 3   # 2: provenance carries the .jpg checksum (shardfmt CHECKSUM_KEY); 3: de-identification


@dataclass(frozen=True, slots=True)
class FileTask:
    file_id: int
    source: str
    path: str            # absolute
    relpath: str         # relative to the source root (provenance)
    kind: str
    stride: int
    labels: tuple[str, ...]
    device: str | None
    size: int
    mtime_ns: int
    mask_name: str = ""      # the curation.mask_name_patterns glob its name matches: rejected undecoded
    mask_check: bool = True  # test decoded still images for mask-like content (off: allow_mask_like)
    public_path: str = ""    # the provenance's `path` when de-identified (a path id, deid.py); "" = relpath


@dataclass(frozen=True)
class ChunkTask:
    index: int
    files: tuple[FileTask, ...]
    params: FrameParams
    ontology_hash: str
    label_bytes: dict          # labels tuple -> closed int8 label vector bytes
    directory: str
    key_salt: str = ""         # de-identification: sample keys are keyed hashes of the pixel hash (deid.py)

    @cached_property
    def digest(self) -> str:
        blob = json.dumps([STAGE_FORMAT, asdict(self.params), self.ontology_hash,
                           [[f.source, f.path, f.relpath, f.kind, f.stride, list(f.labels), f.device,
                             f.size, f.mtime_ns, self.label_bytes[f.labels].hex(), f.mask_name, f.mask_check,
                             f.public_path]
                            for f in self.files], salt_id(self.key_salt) if self.key_salt else ""],
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def stem(self) -> Path:
        # Sub-folders of 1000 chunks keep directories small at millions of files.
        return Path(self.directory) / f"{self.index // 1000:05d}" / f"chunk-{self.index:07d}-{self.digest}"

    @property
    def bin_path(self) -> Path:
        return self.stem.with_suffix(".bin")

    @property
    def meta_path(self) -> Path:
        return self.stem.with_suffix(".json")

    def is_done(self) -> bool:
        try:
            meta = json.loads(self.meta_path.read_text())
            return meta.get("digest") == self.digest and self.bin_path.stat().st_size == meta["bin_bytes"]
        except (OSError, ValueError, KeyError):
            return False


def _provenance(f: FileTask, frame_index, frame, orig_shape, ontology_hash: str, dicom: dict | None,
                text_action: str) -> bytes:
    prov = {"source": f.source, "path": f.public_path or f.relpath, "frame": frame_index, "labels": list(f.labels),
            "width": frame.width, "height": frame.height, "crop": list(frame.crop),
            "crop_discarded": round(frame.discarded, 4),
            "orig_width": int(orig_shape[1]), "orig_height": int(orig_shape[0]),
            "device": f.device, "ontology_hash": ontology_hash, CHECKSUM_KEY: jpg_checksum(frame.jpeg)}
    if f.public_path:
        prov["deid"] = True
    if dicom:
        prov["dicom"] = dicom
    if frame.text_boxes:
        prov["text_boxes"] = [list(b) for b in frame.text_boxes]
        prov["text_blanked"] = text_action == "blank"
    return json.dumps(prov, sort_keys=True, separators=(",", ":")).encode()


def stage_chunk(task: ChunkTask) -> tuple[int, int]:
    """Curate every file of the chunk; returns (number of files, number of samples staged).

    A file that cannot be read or decoded is recorded as `corrupt` with its error (the frames it
    yielded before failing are kept); what the decoders reject themselves (media.py: `too_large`
    before decoding, `truncated_video` after the last readable frame) is recorded under that
    reason; nothing here raises for bad input."""
    files_meta, offset, n_samples = [], 0, 0
    with atomic_open(task.bin_path, "wb") as fh:
        for f in task.files:
            entry = {"id": f.file_id, "samples": [], "rejected": []}
            lbl = task.label_bytes[f.labels]
            if f.mask_name:
                entry["rejected"].append(["mask_like", None, f"file name matches {f.mask_name!r} "
                                                             f"(curation.mask_name_patterns)"])
                files_meta.append(entry)
                continue
            frames, frame_index = iter_frames(Path(f.path), f.kind, f.stride, task.params.max_pixels), None
            dicom = dicom_metadata(f.path) if f.kind == "dicom" else None  # the allow-listed tags only
            while True:
                # Only decoding and curating are guarded: a failing write (disk full) must stop
                # the build, not be blamed on the file.
                try:
                    frame_index, gray = next(frames)
                    if f.mask_check and f.kind == "image":  # masks are stills; cine frames never are
                        check_mask_content(gray, task.params.min_nonzero)
                    frame = curate_frame(gray, task.params)
                except StopIteration:
                    break
                except Rejected as rej:
                    entry["rejected"].append([rej.reason, frame_index, str(rej)])
                    continue
                except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
                    where = f" (after frame {frame_index})" if frame_index is not None else ""
                    entry["rejected"].append(["corrupt", None, f"{type(exc).__name__}: {exc}{where}"[:500]])
                    break
                prov = _provenance(f, frame_index, frame, gray.shape, task.ontology_hash, dicom,
                                   task.params.burned_in_text)
                key = sample_key(task.key_salt, frame.key) if task.key_salt else frame.key
                fh.write(frame.jpeg)
                fh.write(lbl)
                fh.write(prov)
                entry["samples"].append([key, f"{frame.phash:016x}", offset,
                                         len(frame.jpeg), len(lbl), len(prov), frame_index,
                                         [list(b) for b in frame.text_boxes]])
                offset += len(frame.jpeg) + len(lbl) + len(prov)
                n_samples += 1
            files_meta.append(entry)
    atomic_write_json(task.meta_path, {"digest": task.digest, "bin_bytes": offset, "files": files_meta},
                      indent=None)
    return len(task.files), n_samples


def init_worker() -> None:
    # One decode per process: library thread pools would only fight the other workers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Corrupt videos are reported in the manifest; FFmpeg's own complaints would only garble
    # the progress bar.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2
    cv2.setNumThreads(1)
