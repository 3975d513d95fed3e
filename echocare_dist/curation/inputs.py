"""What a shard build reads: label mappings -> the file list, its staging chunks, and the
fingerprint that tells a finished build whether its inputs (or the plan's settings) changed.

Discovery is sorted, so the same folders always give the same files, chunks and fingerprint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..ontology import Ontology
from ..shardfmt import MANIFEST_FORMAT
from . import deid as deidmod
from .mapping import Source
from .media import discover
from .preprocess import FrameParams
from .screen import screen_files
from .stage import ChunkTask, FileTask


@dataclass
class Inputs:
    sources: list[Source]
    files: list[FileTask]
    ignored: list[str]
    chunks: list[ChunkTask]
    source_files: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)   # by the mapping's `exclude:` globs
    public: list[str] = field(default_factory=list)     # per file: its path as the manifest shows it (deid.py)
    deid: "deidmod.Deid | None" = None


def collect_inputs(sources: list[Source], cfg: Config, ontology: Ontology, staging: Path,
                   exclude: tuple[Path, ...], deid: "deidmod.Deid | None" = None) -> Inputs:
    c = cfg.curation
    files: list[FileTask] = []
    ignored: list[str] = []
    source_files: dict[str, int] = {}
    excluded: list[str] = []
    public: list[str] = []
    for src in sources:
        media, skipped = discover(src.root, exclude=exclude)
        ignored += deidmod.public_paths(deid, src, skipped)
        media, left_out = screen_files(src, media, c.mask_name_patterns)
        excluded += deidmod.public_paths(deid, src, left_out)
        source_files[src.name] = len(media)
        stride = src.frame_stride or c.frame_stride
        for m, mask_name in media:
            files.append(FileTask(len(files), src.name, str(m.path), m.relpath, m.kind, stride,
                                  src.labels_for(m.relpath), src.device, m.size, m.mtime_ns,
                                  mask_name=mask_name, mask_check=not src.allow_mask_like,
                                  public_path=deid.path_id(src.name, m.relpath) if deidmod.hides(deid, src) else ""))
            public.append(files[-1].public_path or str(m.path))
    vectors = {labels: ontology.label_vector(labels).tobytes() for labels in {f.labels for f in files}}
    params = FrameParams.from_config(c)
    chunks = []
    for start in range(0, len(files), c.chunk_files):
        part = tuple(files[start:start + c.chunk_files])
        chunks.append(ChunkTask(len(chunks), part, params, ontology.hash,
                                {f.labels: vectors[f.labels] for f in part}, str(staging / "chunks"),
                                key_salt=deid.salt if deid is not None else ""))
    return Inputs(sources, files, ignored, chunks, source_files, excluded, public, deid)


def build_fingerprint(inputs: Inputs, cfg: Config, ontology: Ontology) -> str:
    c = cfg.curation
    blob = json.dumps({"format": MANIFEST_FORMAT, "ontology": ontology.hash,
                       "chunks": [t.digest for t in inputs.chunks],
                       "plan": [c.near_dedup, c.near_dedup_similarity, c.seed, c.shard_max_samples,
                                c.shard_max_bytes, c.label_conflict, c.val_fraction]}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
