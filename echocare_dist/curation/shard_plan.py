"""Stage 2 of a shard build, the plan (main process, metadata only): exact dedupe by pixel hash
(first in file order wins), optional near-dedupe by perceptual hash, label conflicts settled,
the validation hold-out set aside, the reject bookkeeping and counts, a seeded global shuffle,
and the cut into shards by `shard_max_samples` / `shard_max_bytes`.

Every step is ordered or seeded, so the same staged chunks always give the same plan."""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field

import numpy as np

from ..config import Config
from ..ontology import Ontology
from ..shardfmt import TAR_BLOCK, TAR_RECORD, tar_member_bytes
from . import deid as deidmod
from . import valsplit
from .conflicts import resolve as resolve_conflicts
from .inputs import Inputs
from .neardup import NearDuplicateIndex

# truncated_video: recorded with its frames kept (media.py); too_large: over curation.max_pixels;
# unsupported_codec: a DICOM syntax nothing installed decodes (dicom_codecs.py), not damage.
REJECT_REASONS = ("corrupt", "too_few_pixels", "duplicate", "near_duplicate", "truncated_video", "too_large",
                  "mask_like", "crop_failed", "unsupported_codec")


@dataclass
class Plan:
    keys: np.ndarray            # uint64 per staged sample
    chunk: np.ndarray           # int32
    offset: np.ndarray          # int64
    lengths: np.ndarray         # int32 (N, 3): jpg, lbl, json
    shards: list[np.ndarray]    # staged-sample indices per shard, in shard order
    rejected: dict
    per_source: dict
    per_node: dict
    source_detail: list
    relabel: dict = field(default_factory=dict)          # sample -> (labels, label bytes): conflicts settled
    label_conflicts: list = field(default_factory=list)
    val: "Plan | None" = None                           # the validation hold-out (valsplit.py)
    val_groups: dict = field(default_factory=dict)      # held-out sample -> its group id
    text_flagged: list = field(default_factory=list)    # kept samples with burned-in text [{key, path, frame, boxes}]


def _as_numpy(values: array, dtype) -> np.ndarray:
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)


def _sample_ref(inputs: Inputs, file_id: int, frame) -> dict:
    return {"path": inputs.public[file_id], "frame": frame}


def plan_shards(inputs: Inputs, cfg: Config, ontology: Ontology) -> Plan:
    c = cfg.curation
    # Typed arrays, not lists of Python ints: ~50 bytes per staged sample at millions of samples.
    keys, phashes = array("Q"), array("Q")
    chunk, lengths = array("i"), array("i")
    offset, file_id, frames = array("q"), array("q"), array("q")  # frame -1 = a still image
    rejected = {r: [] for r in REJECT_REASONS}
    rejected_per_source: dict[str, int] = {s.name: 0 for s in inputs.sources}
    text_boxes: dict[int, list] = {}   # staged sample -> burned-in text boxes (stage.py)
    for t in inputs.chunks:
        meta = json.loads(t.meta_path.read_text())
        for fe in meta["files"]:
            fid = fe["id"]
            for key, ph, off, lj, ll, ls, fr, *text in fe["samples"]:
                if text and text[0]:
                    text_boxes[len(keys)] = text[0]
                keys.append(int(key, 16))
                phashes.append(int(ph, 16))
                chunk.append(t.index)
                offset.append(off)
                lengths.extend((lj, ll, ls))
                file_id.append(fid)
                frames.append(-1 if fr is None else fr)
            for reason, fr, detail in fe["rejected"]:
                item = _sample_ref(inputs, fid, fr)
                f = inputs.files[fid]
                item["error" if reason == "corrupt" else "detail"] = deidmod.scrub(detail, f.path, f.relpath,
                                                                                    inputs.public[fid])
                rejected[reason].append(item)
                rejected_per_source[inputs.files[fid].source] += 1
    n = len(keys)
    keys_a, file_a = _as_numpy(keys, np.uint64), _as_numpy(file_id, np.int64)

    def ref(i: int) -> dict:
        fr = frames[i]
        return _sample_ref(inputs, int(file_a[i]), None if fr < 0 else fr)

    def reject(reason: str, i: int, of: int) -> None:
        item = ref(i)
        item["of"] = {"key": f"{int(keys_a[of]):016x}", **ref(of)}
        rejected[reason].append(item)
        rejected_per_source[inputs.files[int(file_a[i])].source] += 1

    # Exact duplicates: the first occurrence in (sorted) file order is kept. `groups`: kept
    # sample -> the samples dropped as its duplicates (their labels may conflict).
    groups: dict[int, list[int]] = {}
    keep = np.zeros(n, dtype=bool)
    if n:
        _, first, inverse = np.unique(keys_a, return_index=True, return_inverse=True)
        first_of = first[inverse.ravel()]
        keep = first_of == np.arange(n)
        for i in np.flatnonzero(~keep):
            reject("duplicate", int(i), int(first_of[i]))
            groups.setdefault(int(first_of[i]), []).append(int(i))
    if c.near_dedup:
        index = NearDuplicateIndex(c.near_dedup_similarity)
        for i in np.flatnonzero(keep):
            j = index.add(phashes[i], int(i))
            if j is not None:
                keep[i] = False
                reject("near_duplicate", int(i), j)
                groups.setdefault(j, []).extend([int(i)] + groups.pop(int(i), []))
    overrides, conflicts = resolve_conflicts(groups, lambda i: inputs.files[int(file_a[i])].labels, ref,
                                             c.label_conflict)

    kept = np.flatnonzero(keep)
    text_flagged = [{"key": f"{int(keys_a[i]):016x}", **ref(int(i)), "boxes": text_boxes[int(i)]}
                    for i in kept if int(i) in text_boxes]
    held = np.zeros(len(kept), dtype=bool)
    if c.val_fraction > 0:
        groups = valsplit.sample_groups(file_a[kept], [phashes[i] for i in kept], c.near_dedup_similarity)
        held = valsplit.choose_held_out(groups, [inputs.files[int(file_a[i])].source for i in kept],
                                        keys_a[kept], c.val_fraction, c.seed)
        val_groups = {int(kept[p]): int(kept[groups[p]]) for p in np.flatnonzero(held)}
    val_kept, kept = kept[held], kept[~held]

    def tally(samples: np.ndarray) -> tuple[dict, dict]:
        per_source = {s.name: 0 for s in inputs.sources}
        label_counts: dict[tuple, int] = {}
        for i in samples:
            f = inputs.files[int(file_a[i])]
            labels = overrides.get(int(i), f.labels)
            per_source[f.source] += 1
            label_counts[labels] = label_counts.get(labels, 0) + 1
        positives = np.zeros(len(ontology), dtype=np.int64)
        for labels, count in label_counts.items():
            positives += (ontology.label_vector(labels) == 1).astype(np.int64) * count
        return per_source, {name: int(v) for name, v in zip(ontology.names, positives)}
    per_source, per_node = tally(kept)

    lengths_a = _as_numpy(lengths, np.int32).reshape(-1, 3)
    order = kept[np.random.default_rng(c.seed).permutation(len(kept))]
    shards = _cut(order, lengths_a, c.shard_max_samples, c.shard_max_bytes)

    source_detail = [{"name": s.name, "root": str(s.root), "mapping": str(s.mapping), "device": s.device,
                      "frame_stride": s.frame_stride or c.frame_stride, "labels": list(s.labels),
                      "files": inputs.source_files[s.name], "samples": per_source[s.name],
                      "rejected": rejected_per_source[s.name]} for s in inputs.sources]
    source_detail = [deidmod.public_source(d, s, inputs.deid) for d, s in zip(source_detail, inputs.sources)]
    rejected_out = {}
    for reason, items in rejected.items():
        rejected_out[reason] = {"count": len(items), "paths": list(dict.fromkeys(i["path"] for i in items)),
                                "details": items}
    relabel = {i: (labels, ontology.label_vector(labels).tobytes()) for i, labels in overrides.items()}
    plan = Plan(keys_a, _as_numpy(chunk, np.int32), _as_numpy(offset, np.int64), lengths_a,
                shards, rejected_out, per_source, per_node, source_detail, relabel, conflicts,
                text_flagged=text_flagged)
    if c.val_fraction > 0:  # even when nothing could be held out: an empty val set says so
        val_order = val_kept[np.random.default_rng([c.seed, 1]).permutation(len(val_kept))]
        plan.val = Plan(plan.keys, plan.chunk, plan.offset, lengths_a,
                        _cut(val_order, lengths_a, c.shard_max_samples, c.shard_max_bytes), {}, *tally(val_kept),
                        [], relabel)
        plan.val_groups = val_groups
    return plan


def _cut(order: np.ndarray, lengths: np.ndarray, max_samples: int, max_bytes: int) -> list[np.ndarray]:
    """Consecutive runs of the shuffled order, each within both limits (a sample larger than the
    byte limit gets a shard of its own rather than failing the build)."""
    sample_bytes = tar_member_bytes(lengths).sum(1) if len(lengths) else np.zeros(0, np.int64)
    shards, start, used = [], 0, 0
    end_blocks = 2 * TAR_BLOCK
    for pos, i in enumerate(order):
        b = int(sample_bytes[i])
        total = -(-(used + b + end_blocks) // TAR_RECORD) * TAR_RECORD
        if pos > start and (pos - start >= max_samples or total > max_bytes):
            shards.append(order[start:pos])
            start, used = pos, 0
        used += b
    if len(order) > start:
        shards.append(order[start:])
    return shards
