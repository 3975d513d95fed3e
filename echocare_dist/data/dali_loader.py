"""DALI reader: webdataset reader -> JPEG decode (GPU "mixed" or CPU) -> SPEC 5 augmentation.

One pipeline definition; `data.device` picks where decoding, cropping/resizing and flips run
("auto": the GPU when the training device is CUDA). DALI also draws the brightness/contrast
factors; `augment.apply_jitter` applies them per batch on the training device, as for the fallback.
One pipeline per epoch (built in well under a second, nothing next to an epoch): the plan in
shards.py fixes its tar order and rank range, `stick_to_shard` keeps it there, and the loader stops
it after `steps_per_epoch` batches.

Resume: the pipeline runs with `enable_checkpointing`; the reader state carries
`pipeline.checkpoint()` (reader position, shuffle buffer, every RNG) and the pipeline is rebuilt
from it with `Pipeline(checkpoint=...)`, so a resumed run produces the same samples with the same
augmentations.

Damaged data: a sample that fails to decode kills a DALI pipeline (no skip option). The reader
catches the failure, finds the shard and key (from DALI's message, which names the sample's
source; else by CPU-decoding the samples that were in flight), records them in
{run_dir}/quarantine.json, rebuilds the epoch's pipeline without that shard and goes on. The epoch
keeps its step count (so ranks stay in step); the rebuilt pipeline starts over on the rank's new
range, so a few samples may repeat in that epoch. Every rank leaves the shard out from the next
epoch on (they read quarantine.json at each epoch start).
"""
from __future__ import annotations

import base64
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..shardfmt import split_name
from .augment import AugmentParams, decode_gray
from .contracts import RawBatch, ReaderContext
from .listing import PositionLookup
from .placement import decode_on_gpu
from .shards import DataLoaderError, EpochPlan, SampleError, ShardError, TarReader, derive_seed

log = logging.getLogger(__name__)

# DALI names the failing sample's source as "<tar>:<offset>:<member>".
_FAILED_SAMPLE = re.compile(r"sample #\d+ : (?P<source>.+\.tar:\d+:\S+)\s*$", re.M)
_BAD_INDEX = re.compile(r'index file at "(?P<path>[^"]+)"')


def parse_source_info(source: str) -> tuple[str, str]:
    """("/path/shard.tar", key) from a webdataset source_info "/path/shard.tar:offset:key.ext"."""
    cut = source.rfind(".tar:")
    if cut < 0:
        raise ValueError(f"unexpected DALI source_info {source!r}")
    member = source[cut + 5:].split(":", 1)[-1]
    return source[: cut + 4], split_name(member)[0]


def build_pipeline(*, paths, index_paths, shard_id: int, num_shards: int, aug: AugmentParams, decode_device: str,
                   hw_decoder_load: float, shuffle_buffer: int, reader_seed: int, use_mmap: bool, batch_size: int,
                   num_threads: int, device_id, seed: int, prefetch: int, checkpoint=None):
    """The DALI graph of SPEC 5 (see augment.py for the definition both loaders share)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        jpg, lbl = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["jpg", "lbl"], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=shuffle_buffer > 1, initial_fill=max(shuffle_buffer, 1), seed=reader_seed,
            pad_last_batch=True, stick_to_shard=True, missing_component_behavior="error",
            dont_use_mmap=not use_mmap, name="reader")
        source = fn.get_property(jpg, key="source_info")
        decoder_args = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
        img = fn.decoders.image(jpg, device=decode_device, output_type=types.GRAY, **decoder_args)
        if fn.random.coin_flip(probability=aug.rrc_prob, dtype=types.BOOL):
            img = fn.random_resized_crop(img, size=(aug.size, aug.size), random_area=list(aug.rrc_scale),
                                         random_aspect_ratio=list(aug.rrc_ratio), num_attempts=10)
        else:
            img = fn.resize(img, size=(aug.size, aug.size))
        img = fn.flip(img, horizontal=fn.random.coin_flip(probability=aug.hflip_prob),
                      vertical=fn.random.coin_flip(probability=aug.vflip_prob))
        # Jitter factors per sample (1, 1 unless the coin says so); applied per batch on the training
        # device by augment.apply_jitter, like the fallback's.
        on = fn.random.coin_flip(probability=aug.jitter_prob)
        b = 1.0 + on * (fn.random.uniform(range=[-aug.brightness, aug.brightness]) if aug.brightness > 0 else 0.0)
        c = 1.0 + on * (fn.random.uniform(range=[-aug.contrast, aug.contrast]) if aug.contrast > 0 else 0.0)
        return img, fn.stack(b, c), lbl, source

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, checkpoint=checkpoint)
    pipe.build()
    return pipe


class DaliReader:
    """The `Reader` (contracts.py) of data.loader=dali: one DALI pipeline per epoch."""

    kind = "dali"

    def __init__(self, ctx: ReaderContext):
        self.ctx = ctx
        on_gpu = decode_on_gpu(ctx.cfg.data, ctx.device)
        if on_gpu and not torch.cuda.is_available():
            raise DataLoaderError("data.device=gpu but CUDA is not available; use data.device=cpu or auto")
        self.decode_device = "mixed" if on_gpu else "cpu"
        if ctx.cfg.data.verify_samples and ctx.rank == 0:
            # The samples never pass through Python here; checking them would mean a second read.
            log.warning("data.verify_samples=true is not checked by the DALI reader: run `echocare shards "
                        "verify` on the shards, or use data.loader=pil to check each sample as it is read")
        self._device_id = (ctx.device.index if ctx.device.type == "cuda" and ctx.device.index is not None
                           else torch.cuda.current_device()) if on_gpu else None
        self._plan: EpochPlan | None = None       # the epoch being read, as the loader planned it
        self._pipe = None
        self._pipe_plan: EpochPlan | None = None  # what the current pipeline reads: the plan minus _extra
        self._extra: set[str] = set()   # shards quarantined during this epoch (pipeline rebuilt without)
        self._generation = 0            # rebuilds in this epoch, part of the pipeline seed
        self._pipe_steps = 0            # batches produced by the current pipeline
        self._seen: set[str] = set()    # keys returned this epoch (known decodable)
        self._lookup: PositionLookup | None = None   # key -> epoch position, for the current pipeline
        self._plan_dir: Path | None = None  # filtered index files of a plan that is not whole tars
        self._index_lines: dict[str, list[str]] = {}
        self._reader_index = TarReader(ctx.num_classes)   # parsed indexes, for the keys of the plan

    def describe(self) -> str:
        return f"DALI ({'GPU mixed decode' if self.decode_device == 'mixed' else 'CPU'})"

    # ------------------------------------------------------------------ pipeline lifecycle
    def _build(self, checkpoint=None) -> None:
        """(Re)build this epoch's pipeline without the shards quarantined so far. A shard whose index
        and tar disagree fails the build itself: it is quarantined and the build retried."""
        ctx, d = self.ctx, self.ctx.cfg.data
        self._pipe = None  # release the old pipeline (and its memory) before the new one allocates
        while True:
            plan = self._plan.without(self._extra) if self._extra else self._plan
            parts = (d.seed, plan.epoch, ctx.world_size, ctx.rank, self._generation)
            try:
                paths, index_paths, shard_id, num_shards = self._sources(plan)
                self._pipe = build_pipeline(
                    paths=paths, index_paths=index_paths,
                    shard_id=shard_id, num_shards=num_shards, aug=ctx.aug, decode_device=self.decode_device,
                    hw_decoder_load=d.hw_decoder_load, shuffle_buffer=d.shuffle_buffer,
                    reader_seed=derive_seed("dali-reader", *parts), use_mmap=d.use_mmap,
                    batch_size=ctx.micro_batch, num_threads=max(1, d.num_threads), device_id=self._device_id,
                    seed=derive_seed("dali", *parts), prefetch=d.prefetch, checkpoint=checkpoint)
            except RuntimeError as exc:
                damage = None if checkpoint is not None else self._damage_from_message(str(exc), plan)
                if not damage:
                    raise
                self._note_damage(damage)
                continue
            self._pipe_plan = plan
            positions = plan.positions()
            keys = [self._index_keys(shard)[i] for shard, i in plan.refs(positions)]
            self._lookup = PositionLookup(keys, positions, self.ctx.consumed())
            return

    def _index_keys(self, shard) -> tuple[str, ...]:
        return self._reader_index.index(shard).keys

    def _sources(self, plan: EpochPlan) -> tuple[list[str], list[str], int, int]:
        """(tars, index files, shard_id, num_shards) that make DALI read exactly this rank's samples.

        A plan of whole tars is read through the tars' own index files, split by DALI itself (the
        same split as the plan's). Any other (a mixture, the unconsumed rest of an epoch): DALI reads
        only whole index files, so each run of the rank's samples in one tar gets an index file
        listing just those samples, in plan order, and this rank reads all of them."""
        ctx = self.ctx
        if plan.whole_shards:
            return [str(s.tar) for s in plan.shards], [str(s.idx) for s in plan.shards], ctx.rank, ctx.world_size
        self._remove_plan_dir()
        self._plan_dir = Path(tempfile.mkdtemp(prefix=f"echocare-dali-plan-r{ctx.rank}-"))
        paths, index_paths = [], []
        for k, seg_refs in enumerate(_runs(plan.refs(plan.positions()))):
            shard = seg_refs[0][0]
            lines = self._sample_lines(shard)
            out = self._plan_dir / f"{k:06d}" / shard.idx.name   # the name still maps back to its shard
            out.parent.mkdir()
            atomic_write_text(out, "\n".join([f"{lines[0].split()[0]} {len(seg_refs)}"] +
                                              [lines[1 + i] for _, i in seg_refs]) + "\n")
            paths.append(str(shard.tar))
            index_paths.append(str(out))
        if not paths:
            raise DataLoaderError(f"rank {ctx.rank}: no samples to read in epoch {plan.epoch}")
        return paths, index_paths, 0, 1

    def _sample_lines(self, shard) -> list[str]:
        """The shard's index as [header, one line per sample] (blank lines dropped)."""
        lines = self._index_lines.get(shard.name)
        if lines is None:
            try:
                text = shard.idx.read_text()
            except OSError as exc:
                raise DataLoaderError(f"cannot read index {shard.idx}: {exc}") from exc
            lines = self._index_lines[shard.name] = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) != shard.samples + 1:
                raise DataLoaderError(f"{shard.idx}: {len(lines) - 1} samples listed, the manifest says {shard.samples}")
        return lines

    def _remove_plan_dir(self) -> None:
        if self._plan_dir is not None:
            shutil.rmtree(self._plan_dir, ignore_errors=True)
            self._plan_dir = None

    def start(self, plan: EpochPlan, position: int, state: dict | None) -> int:
        self._plan, self._seen = plan, set()
        if state:
            self._extra, self._generation = set(state["extra"]), int(state["generation"])
            self._pipe_steps = int(state["pipe_steps"])
            try:
                self._build(base64.b64decode(state["checkpoint"]))
                return position
            except (RuntimeError, ValueError, KeyError) as exc:
                log.warning("rank %d: cannot restore the DALI checkpoint (%s): restarting epoch %d from its "
                            "first step", self.ctx.rank, str(exc).splitlines()[0] if str(exc) else exc, plan.epoch)
                position = 0
        self._extra, self._generation, self._pipe_steps = set(), 0, 0
        self._build()
        return position

    def stop(self) -> None:
        self._pipe = None
        self._pipe_plan = None
        self._lookup = None
        self._seen = set()
        self._remove_plan_dir()

    def state(self) -> dict:
        return {"extra": sorted(self._extra), "generation": self._generation, "pipe_steps": self._pipe_steps,
                "checkpoint": base64.b64encode(self._pipe.checkpoint()).decode("ascii")}

    def compatible(self, state: dict | None) -> bool:
        return state is None or {"extra", "generation", "pipe_steps", "checkpoint"} <= set(state)

    # ------------------------------------------------------------------ batches
    def next_batch(self, position: int) -> RawBatch:
        while True:
            try:
                images, jitter, lbl, source = self._pipe.run()
            except RuntimeError as exc:
                self.recover(str(exc), position)
                continue
            sources = [parse_source_info(bytes(np.asarray(source.at(i))).decode()) for i in range(len(source))]
            labels = self._labels(lbl)
            if isinstance(labels, list):  # some .lbl of the wrong size: that shard is damaged
                self._quarantine_damage([(sources[i][0], sources[i][1], reason) for i, reason in labels], position)
                continue
            keys = [key for _, key in sources]
            self._pipe_steps += 1
            self._seen.update(keys)
            return RawBatch(self._to_torch(images), torch.from_numpy(np.array(jitter.as_array(), np.float32)),
                            labels, keys, self._lookup.take(keys))

    def _labels(self, lbl) -> np.ndarray | list[tuple[int, str]]:
        """int8 (B, C), or [(sample, reason)] for the samples whose label has the wrong length."""
        num_classes = self.ctx.num_classes
        if lbl.is_dense_tensor():
            arr = np.asarray(lbl.as_array())
            if arr.ndim == 2 and arr.shape[1] == num_classes:
                return arr.view(np.int8).copy()
        sizes = [int(np.asarray(lbl.at(i)).size) for i in range(len(lbl))]
        return [(i, f"label has {n} bytes, the ontology has {num_classes} nodes")
                for i, n in enumerate(sizes) if n != num_classes]

    def _to_torch(self, images) -> torch.Tensor:
        """The pipeline's uint8 (B, S, S, 1) batch as a torch (B, 1, S, S) tensor (a copy: DALI reuses
        its buffers), on the GPU for mixed decoding."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = images.as_tensor()
        shape = tuple(dense.shape())
        if self.decode_device == "mixed":
            out = torch.empty(shape, dtype=torch.uint8, device=torch.device("cuda", self._device_id))
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
        else:
            out = torch.empty(shape, dtype=torch.uint8)
            feed_ndarray(dense, out)
        return out.permute(0, 3, 1, 2)                   # C = 1: still contiguous

    # ------------------------------------------------------------------ damaged data
    def recover(self, message: str, position: int) -> None:
        """After the pipeline failed with `message` while producing batch `position`: quarantine the
        damaged shard and rebuild the pipeline without it."""
        damage = self._damage_from_message(message, self._pipe_plan) or self._scan_in_flight()
        if not damage:
            raise DataLoaderError(
                f"rank {self.ctx.rank}: the DALI pipeline failed in epoch {self._plan.epoch} at step {position} "
                f"and no damaged shard could be identified (the samples in flight decode on the CPU): "
                f"{_summary(message)}")
        self._quarantine_damage(damage, position)

    def _quarantine_damage(self, damage: list[tuple[str, str | None, str]], position: int) -> None:
        self._note_damage(damage)
        log.warning("rank %d: rebuilding the DALI pipeline without %s for the remaining %d steps of epoch %d",
                    self.ctx.rank, sorted(self._extra), self._plan.steps - position, self._plan.epoch)
        self._build()

    def _note_damage(self, damage: list[tuple[str, str | None, str]]) -> None:
        """Record (tar path, key, reason) entries and leave their shards out of this epoch's pipeline."""
        ctx, epoch = self.ctx, self._plan.epoch
        found, samples = {}, []
        for path, key, reason in damage:
            shard = ctx.shard_set.shard_of_path(path)
            if shard is None:
                raise DataLoaderError(f"DALI reported damage in {path}, which is not a shard of {ctx.shard_set.root}")
            found.setdefault(shard.name, {"reason": reason, **({"key": key} if key else {})})
            if key:
                samples.append((shard.name, key, reason))
        already = set(self._plan.excluded) | self._extra
        if not set(found) - already:  # would rebuild the same pipeline forever
            raise DataLoaderError(f"rank {ctx.rank}: DALI keeps failing on already quarantined shard(s) "
                                  f"{sorted(found)}: {damage[0][2]}")
        ctx.quarantine.record_samples(samples, epoch)
        ctx.quarantine.record_shards({k: v for k, v in found.items() if k not in already}, epoch,
                                     count_as_bad_samples=not samples)
        self._extra |= set(found)
        ctx.quarantine.check_limit(set(self._plan.excluded) | self._extra)
        self._generation += 1
        self._pipe_steps = 0

    def _damage_from_message(self, message: str, plan: EpochPlan | None) -> list[tuple[str, str | None, str]]:
        damage = []
        for m in _FAILED_SAMPLE.finditer(message):
            try:
                path, key = parse_source_info(m["source"])
            except ValueError:
                continue
            damage.append((path, key, f"DALI could not decode it: {_summary(message)}"))
        for m in _BAD_INDEX.finditer(message):
            damage.append((m["path"], None, f"tar and index disagree: {_summary(message)}"))
        if not damage and plan is not None:
            for s in plan.shards:
                if str(s.tar) in message or str(s.idx) in message:
                    damage.append((str(s.tar), None, _summary(message)))
        return [d for d in damage if self.ctx.shard_set.shard_of_path(d[0]) is not None]

    def _scan_in_flight(self) -> list[tuple[str, str | None, str]]:
        """CPU-decode the samples the reader may have handed to the decoder and not yet returned.

        The reader reads the rank's range in order through a shuffle buffer of `shuffle_buffer`
        samples and runs up to `prefetch` batches (+ its own and the decoder's) ahead."""
        plan = self._pipe_plan
        d = self.ctx.cfg.data
        horizon = (self._pipe_steps + d.prefetch + 3) * self.ctx.micro_batch + max(d.shuffle_buffer, 1)
        reader = TarReader(self.ctx.num_classes)
        damage = []
        try:
            for seg in plan.segments(plan.start, min(plan.end, plan.start + horizon)):
                try:
                    keys = reader.index(seg.shard).keys
                except (ShardError, OSError) as exc:
                    damage.append((str(seg.shard.tar), None, f"index unreadable: {exc}"))
                    continue
                for i in range(seg.first, seg.last):
                    if keys[i] in self._seen:
                        continue
                    try:
                        decode_gray(reader.read(seg.shard, i)[0])
                    except (SampleError, OSError, ValueError, SyntaxError) as exc:
                        damage.append((str(seg.shard.tar), keys[i], f"CPU decode failed: {exc}"))
        finally:
            reader.close()
        return damage


def _runs(refs: list) -> list[list]:
    """(shard, index) refs cut into runs of consecutive refs of one shard."""
    out: list[list] = []
    for ref in refs:
        if out and out[-1][0][0] is ref[0]:
            out[-1].append(ref)
        else:
            out.append([ref])
    return out


def _summary(message: str, limit: int = 300) -> str:
    """The informative lines of a DALI error (after 'encountered:'), without the boilerplate."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [ln for ln in lines if not ln.startswith(("Current pipeline object", "C++ context", "Critical error"))]
    text = " | ".join(lines) or message.strip()
    return text[:limit]
