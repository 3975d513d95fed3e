"""`build_shards`: label mappings -> shuffled, deduplicated WebDataset shards + manifest (SPEC 6).

Discovery, the staging chunks and the build's fingerprint come from inputs.py. Then three
stages, each restartable:
1. stage (parallel, see stage.py): decode, crop, filter, hash, JPEG-encode every file; results
   spill to the staging folder in chunks.
2. plan (main process, metadata only; shard_plan.py): exact dedupe by pixel hash (first in
   file order wins), optional near-dedupe by perceptual hash, counts, a seeded global shuffle,
   and the cut into shards by `shard_max_samples` / `shard_max_bytes`.
3. write: each shard is written to a temporary name, indexed, then renamed (shardfmt.ShardWriter);
   a record with its sha256 goes to the staging folder. A rerun skips a shard only if its record
   matches the plan and the tar's and index's sha256 match the record.
The manifest is written last and is the commit point: it is deleted when a build starts, so a
directory with a manifest always holds exactly the shards it lists. After success the staging
folder is removed; running the same build again finds the manifest up to date and returns it.

Everything is deterministic (sorted discovery, ordered planning, seeded shuffle, fixed tar
mtimes), so a build that crashed and was resumed is byte-identical to a clean one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..atomic import _fsync_dir, atomic_write_json, file_sha256
from ..config import Config, save_resolved
from ..ontology import Ontology
from ..shardfmt import MANIFEST, SHARD_RE, Manifest, ShardError, ShardWriter, keys_digest, shard_name
from . import deid as deidmod
from . import valsplit
from .conflicts import relabel
from .inputs import Inputs, build_fingerprint, collect_inputs  # noqa: F401  (Inputs: re-exported)
from .mapping import Source, load_mappings
from .outdir import CurationError, build_lock, damaged_shards, keep_intact_shards, shard_entries
from .shard_plan import REJECT_REASONS, Plan, plan_shards  # noqa: F401  (REJECT_REASONS: re-exported)
from .stage import ChunkTask, init_worker, stage_chunk

log = logging.getLogger(__name__)

STAGING_NAME = ".staging"


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------
def _progress(total: int, desc: str, unit: str, enabled: bool):
    from ..progress import progress_bar
    return progress_bar(total=total, desc=desc, unit=unit, enabled=enabled)


def stage_all(chunks: list[ChunkTask], workers: int, progress: bool) -> None:
    todo = [t for t in chunks if not t.is_done()]
    total = sum(len(t.files) for t in chunks)
    with _progress(total, "curate", "file", progress) as bar:
        bar.update(total - sum(len(t.files) for t in todo))
        if workers <= 1 or len(todo) <= 1:
            import cv2
            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)  # same per-worker budget as the pool (and honest 1-worker benchmarks)
            try:
                for task in todo:
                    bar.update(stage_chunk(task)[0])
            finally:
                cv2.setNumThreads(threads)
            return
        # Bounded in-flight window: the queue of pending tasks never holds the whole file list.
        # spawn, not fork: the caller may hold threads (DALI, torch) that a fork would copy mid-lock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=init_worker) as pool:
            inflight: dict = {}
            queue = iter(todo)
            for task in queue:
                inflight[pool.submit(stage_chunk, task)] = task
                if len(inflight) >= 4 * workers:
                    break
            while inflight:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        bar.update(fut.result()[0])
                    except BrokenProcessPool as exc:
                        suspects = [f.path for t in inflight.values() for f in t.files]
                        raise CurationError(
                            f"a curation worker died (a decoder crashed or ran out of memory) on one of "
                            f"{len(suspects)} files: {suspects[:8]}{' ...' if len(suspects) > 8 else ''}; "
                            f"move the culprit away and rerun (finished chunks are kept)") from exc
                    del inflight[fut]
                    nxt = next(queue, None)
                    if nxt is not None:
                        inflight[pool.submit(stage_chunk, nxt)] = nxt


# ---------------------------------------------------------------------------------------------
# stage 3: write
# ---------------------------------------------------------------------------------------------
class _BinReader:
    """pread from the staged chunk files, keeping a few of them open."""

    def __init__(self, chunks: list[ChunkTask], max_open: int = 64):
        self.chunks, self.max_open = chunks, max_open
        self.fds: OrderedDict[int, int] = OrderedDict()

    def read(self, chunk: int, offset: int, length: int) -> bytes:
        fd = self.fds.pop(chunk, None)
        if fd is None:
            fd = os.open(self.chunks[chunk].bin_path, os.O_RDONLY)
            if len(self.fds) >= self.max_open:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[chunk] = fd
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise CurationError(f"staged chunk {self.chunks[chunk].bin_path} is truncated")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _shard_record_ok(record_path: Path, tar: Path, planned: dict) -> dict | None:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if any(record.get(k) != v for k, v in planned.items()):
        return None
    idx = tar.with_suffix(".idx")
    if not tar.is_file() or not idx.is_file() or tar.stat().st_size != record.get("bytes"):
        return None
    if file_sha256(tar) != record.get("sha256") or file_sha256(idx) != record.get("idx_sha256"):
        return None
    return record


def write_shard(path: Path, members: np.ndarray, plan: Plan, reader: _BinReader) -> dict:
    """Write one shard atomically (tar + DALI index); returns its record."""
    keys = [f"{int(plan.keys[i]):016x}" for i in members]
    with ShardWriter(path) as writer:
        for key, i in zip(keys, members):
            lj, ll, ls = (int(x) for x in plan.lengths[i])
            blob = reader.read(int(plan.chunk[i]), int(plan.offset[i]), lj + ll + ls)
            parts = {"jpg": blob[:lj], "lbl": blob[lj:lj + ll], "json": blob[lj + ll:]}
            if int(i) in plan.relabel:
                parts = relabel(parts, *plan.relabel[int(i)])
            writer.write(key, parts)
    return {**writer.entry.to_dict(), "idx_sha256": file_sha256(path.with_suffix(".idx"))}


def write_all(plan: Plan, chunks: list[ChunkTask], out_dir: Path, staging: Path, progress: bool) -> list[dict]:
    records_dir = staging / "shards"
    records_dir.mkdir(parents=True, exist_ok=True)
    reader = _BinReader(chunks)
    records = []
    try:
        with _progress(len(plan.shards), "write", "shard", progress) as bar:
            for i, members in enumerate(plan.shards):
                path = out_dir / shard_name(i)
                planned = {"name": path.name, "samples": int(len(members)),
                           "keys_sha256": keys_digest([f"{int(plan.keys[j]):016x}" for j in members])}
                record_path = records_dir / f"{path.stem}.json"
                record = _shard_record_ok(record_path, path, planned)
                if record is None:
                    record = write_shard(path, members, plan, reader)
                    atomic_write_json(record_path, record)
                records.append(record)
                bar.update(1)
    finally:
        reader.close()
    return records


def _remove_leftovers(out_dir: Path, num_shards: int | None) -> None:
    """Temporary files of interrupted writes and, once the shard count is known, shards beyond it."""
    ours = (".shard-", f".{MANIFEST}.", ".config.resolved.yaml.")
    for entry in out_dir.iterdir():
        name = entry.name
        if name.startswith(ours) and name.endswith((".partial", ".tmp")):
            entry.unlink(missing_ok=True)
        elif num_shards is not None:
            m = SHARD_RE.match(name)
            if m and int(m.group(1)) >= num_shards:
                entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def _manifest_up_to_date(out_dir: Path, fingerprint: str, verify: bool, records_dir: Path) -> Manifest | None:
    """The manifest when the inputs are unchanged and its shards intact (outdir.damaged_shards);
    with damaged shards, None after recording the intact ones so that only the damaged are rewritten."""
    try:
        manifest = Manifest.read(out_dir)
    except ShardError:
        return None
    if manifest.fingerprint != fingerprint:
        return None
    damaged = damaged_shards(out_dir, manifest, full=verify)
    if not damaged:
        return manifest
    log.warning("%s: %d damaged shard(s), rebuilding them: %s", out_dir, len(damaged),
                "; ".join(f"{name}: {why}" for name, why in list(damaged.items())[:10]))
    keep_intact_shards(records_dir, manifest, damaged)
    return None


_exclusive = build_lock  # one build per shard directory at a time (two would overwrite each other's shards)


def staging_dir(cfg: Config, out_dir: Path) -> Path:
    """Where stage 1 spills. With `curation.staging_dir` set (e.g. node-local NVMe) we use a
    sub-folder named after the output, never the folder itself: it is deleted after success."""
    if not cfg.curation.staging_dir:
        return out_dir / STAGING_NAME
    tag = hashlib.sha256(str(out_dir).encode()).hexdigest()[:12]
    return Path(cfg.curation.staging_dir).expanduser().resolve() / f"echocare-staging-{out_dir.name}-{tag}"


def build_shards(mappings: list[Path], out_dir: Path, cfg: Config, ontology: Ontology,
                 progress: bool = True, verify: bool = False) -> Manifest:
    """Build (or finish, or confirm) the shards of `mappings` in `out_dir`; returns the manifest.

    `verify`: before calling an existing build up to date, hash every tar in full (sizes and
    indexes are always checked); damaged shards are rebuilt either way."""
    sources = load_mappings([Path(m) for m in mappings], ontology)  # all checks before any work
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        return _build(sources, out_dir, cfg, ontology, progress, verify)


def _build(sources: list[Source], out_dir: Path, cfg: Config, ontology: Ontology, progress: bool,
           verify: bool = False) -> Manifest:
    c = cfg.curation
    staging = staging_dir(cfg, out_dir)
    deid = deidmod.open_deid(out_dir, c.deid, c.deid_map)
    inputs = collect_inputs(sources, cfg, ontology, staging, exclude=(out_dir, staging), deid=deid)
    if deid is not None:  # first: staged chunks carry its salt, so a crashed build resumes with it
        deidmod.write_path_map(deid, out_dir, sources)
    fingerprint = build_fingerprint(inputs, cfg, ontology)

    manifest = _manifest_up_to_date(out_dir, fingerprint, verify, staging / "shards")
    if manifest is not None and not valsplit.held_out_damaged(out_dir, manifest, c.val_fraction, verify, staging):
        log.info("%s: shards are up to date (%d samples in %d shards)", out_dir,
                 manifest.num_samples, len(manifest.shards))
        return manifest
    # The manifest is the commit point: from here on the directory is "being built".
    (out_dir / MANIFEST).unlink(missing_ok=True)
    valsplit.clear_held_out(out_dir, c.val_fraction)
    _fsync_dir(out_dir)
    _remove_leftovers(out_dir, None)

    stage_all(inputs.chunks, c.workers, progress)
    plan = plan_shards(inputs, cfg, ontology)
    records = write_all(plan, inputs.chunks, out_dir, staging, progress)
    _remove_leftovers(out_dir, len(records))

    manifest = Manifest(
        ontology_hash=ontology.hash,
        ontology_nodes=len(ontology),
        ontology_names=list(ontology.names),
        num_samples=int(sum(r["samples"] for r in records)),
        shards=shard_entries(records),
        per_source=plan.per_source,
        per_node=plan.per_node,
        rejected=plan.rejected,
        sources=plan.source_detail,
        files=len(inputs.files),
        staged_samples=int(len(plan.keys)),
        ignored={"count": len(inputs.ignored), "paths": inputs.ignored[:100]},
        excluded={"count": len(inputs.excluded), "paths": inputs.excluded[:100]},
        label_conflicts=plan.label_conflicts,
        # What shaped the content (not how fast or where it was staged): a resumed build with
        # other worker counts still yields an identical manifest.
        curation={k: v for k, v in cfg.to_dict()["curation"].items()
                  if k not in ("workers", "staging_dir", "chunk_files", "deid_map")},
        fingerprint=fingerprint,
        deid=deidmod.manifest_section(deid, sources, c.burned_in_text, plan.text_flagged),
    )
    if plan.val is not None:  # before the main manifest, the build's commit point
        base = {k: getattr(manifest, k) for k in ("ontology_hash", "ontology_nodes", "ontology_names", "curation",
                                                  "fingerprint", "deid")}
        valsplit.write_held_out(out_dir, plan.val.shards,
                                lambda d: write_all(plan.val, inputs.chunks, d, staging / valsplit.VAL_DIR, progress),
                                plan.val_groups, plan.val.per_source, plan.val.per_node, base)
    save_resolved(cfg, out_dir)
    manifest.write(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest
