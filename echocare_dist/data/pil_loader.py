"""PIL reader (data.loader=pil): the fallback, the shards read with PIL in torch DataLoader workers.

For machines without DALI, and as the reference the DALI path is tested against: same epoch plan
(shards.py), same augmentation definition (augment.py), same masks and labels.

Splitting. The rank's sample range (split by node, identical to DALI's shard_id/num_shards) is cut
into one contiguous chunk per worker (split by worker), each a "stream" that reads its own tars;
a tar-granular split (webdataset's split_by_node / split_by_worker) would give ranks different
sample counts, and idle workers whenever a rank holds fewer tars than workers. Batch b of the epoch
comes from stream b % S, which is the order in which the DataLoader collects from its S workers.

Reading. Samples are read by offset through the DALI index of each tar, after a seeded shuffle
buffer over sample positions (the same local shuffle as DALI's `initial_fill`). Because the
shuffle runs over positions and every augmentation draw is seeded by (seed, epoch, key), resuming at
batch b skips the consumed samples without reading or decoding them, and the same images come out
with the same augmentation.

Damaged data. A sample that cannot be read or decoded, or (with data.verify_samples) whose .jpg
does not match the checksum in its .json, is logged, recorded in
{run_dir}/quarantine.json, counted in `bad_samples`, and replaced by the stream's next sample
(open_clip's log-and-continue); a stream that runs out wraps around its chunk with a new shuffle,
so every rank still runs the same number of steps.
"""
from __future__ import annotations

import functools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import AugmentParams, augment, decode_gray
from .contracts import RawBatch, ReaderContext
from .masking import sample_stream_ids
from .shards import DataLoaderError, EpochPlan, SampleError, ShardError, TarReader, buffer_shuffle, derive_seed


def _ignore_signals(names, worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals. Slurm signals the whole job step
    (time limit, scancel), and a worker killed by it would crash the rank before the trainer
    could write its preemption checkpoint; the trainer shuts workers down itself."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class EpochStreams(IterableDataset):
    """The batches of one epoch on one rank from batch `first_batch` on, as S deterministic streams.

    Worker w of the DataLoader serves stream (first_batch + w) % S, so the DataLoader's round robin
    over workers returns batches first_batch, first_batch + 1, ... in order."""

    def __init__(self, plan: EpochPlan, num_streams: int, first_batch: int, known_bad: set[str],
                 aug: AugmentParams, num_classes: int, shuffle_buffer: int, seed: int,
                 verify_samples: bool = False):
        self.plan, self.num_streams, self.first_batch = plan, num_streams, first_batch
        self.verify_samples = verify_samples
        self.known_bad, self.aug, self.num_classes = known_bad, aug, num_classes
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # in-process: a single stream
            if self.num_streams != 1:
                raise RuntimeError("EpochStreams with several streams needs one DataLoader worker per stream")
            yield from self.stream_batches(0)
            return
        if info.num_workers != self.num_streams:
            raise RuntimeError(f"{info.num_workers} workers for {self.num_streams} streams")
        yield from self.stream_batches((self.first_batch + info.id) % self.num_streams)

    def _positions(self, stream: int):
        """(pass, shard, index, position, copy) of stream `stream`, forever: pass p is a fresh shuffle
        of the chunk (position: in the epoch's list; copy: repeat number under a mixture)."""
        p = self.plan
        positions = p.stream_positions(self.num_streams)[stream]
        copies = p.listing.copies(positions)
        refs = [(shard, i, int(pos), int(c)) for (shard, i), pos, c in zip(p.refs(positions), positions, copies)]
        if not refs:
            raise DataLoaderError(f"rank {p.rank}: stream {stream} of epoch {p.epoch} has no samples")
        for pass_no in range(1 << 30):
            # "wds-shuffle": the reader's name when it was written; renaming it would change every order.
            rng = np.random.default_rng(derive_seed("wds-shuffle", self.seed, p.epoch, p.world_size, p.rank,
                                                    stream, pass_no, bits=63))
            for shard, i, pos, copy in buffer_shuffle(refs, self.shuffle_buffer, rng):
                yield pass_no, shard, i, pos, copy

    def stream_batches(self, stream: int):
        S, B, p = self.num_streams, self.plan.micro_batch, self.plan
        batch_ids = range(stream, p.steps, S)
        done = len(range(stream, self.first_batch, S))      # batches of this stream already consumed
        to_skip = done * B
        reader = TarReader(self.num_classes)
        known_bad = set(self.known_bad)
        images, jitter, labels, keys, bad, positions, copies = [], [], [], [], [], [], []
        good_in_pass, last_pass = 0, 0
        try:
            for pass_no, shard, i, pos, copy in self._positions(stream):
                if done >= len(batch_ids):
                    return
                if pass_no != last_pass:
                    if good_in_pass == 0:
                        raise DataLoaderError(f"rank {p.rank}: no readable sample in stream {stream} of epoch "
                                              f"{p.epoch} (shards {sorted({s.shard.name for s in p.stream_segments(S)[stream]})})")
                    good_in_pass, last_pass = 0, pass_no
                try:
                    key = reader.key(shard, i)
                except (ShardError, OSError) as exc:
                    raise DataLoaderError(f"cannot read the index of {shard.tar}: {exc}") from exc
                tag = f"{shard.name}/{key}"
                if tag in known_bad:
                    continue
                if to_skip:
                    to_skip -= 1
                    good_in_pass += 1
                    continue
                try:
                    jpg, lbl = reader.read(shard, i)
                    if self.verify_samples:
                        reader.check_checksum(shard, i, jpg)
                    im = decode_gray(jpg)
                except (SampleError, OSError, ValueError, SyntaxError) as exc:
                    known_bad.add(tag)
                    bad.append((shard.name, key, f"{type(exc).__name__}: {exc}"))
                    continue
                good_in_pass += 1
                # A mixture's repeat (copy > 0) gets its own draw; copy 0 keeps the original stream.
                salt = (pass_no,) if copy == 0 else (pass_no, "copy", copy)
                sid = int(sample_stream_ids([key], "augment", self.seed, p.epoch, *salt)[0])
                image, factors = augment(im, np.random.default_rng(sid), self.aug)
                images.append(image)
                jitter.append(factors)
                labels.append(lbl)
                keys.append(key)
                # A wrapped-around pass repeats samples: they are not new positions of the epoch.
                positions.append(pos if pass_no == 0 else -1)
                copies.append(copy)
                if len(keys) == B:
                    yield dict(index=batch_ids[done], images=torch.from_numpy(np.stack(images))[:, None],
                               jitter=torch.tensor(jitter, dtype=torch.float32),
                               labels=torch.from_numpy(np.stack(labels)), keys=keys, bad=bad,
                               positions=np.asarray(positions, np.int64), copies=np.asarray(copies, np.int32))
                    done += 1
                    images, jitter, labels, keys, bad, positions, copies = [], [], [], [], [], [], []
        finally:
            reader.close()


class PilReader:
    """The `Reader` (contracts.py) of data.loader=pil: `EpochStreams` in data.num_threads workers."""

    kind = "pil"

    def __init__(self, ctx: ReaderContext):
        self.ctx = ctx
        self._plan: EpochPlan | None = None
        self._it = None
        self._streams = 0

    def describe(self) -> str:
        n = self.ctx.cfg.data.num_threads
        return f"PIL fallback ({n} worker{'s' if n != 1 else ''})" if n else "PIL fallback (in-process)"

    def start(self, plan: EpochPlan, position: int, state: dict | None) -> int:
        # No reader state to apply: the streams of `plan` skip the first `position` batches by
        # themselves (see EpochStreams); `compatible` refused states of other stream layouts.
        ctx, d = self.ctx, self.ctx.cfg.data
        self._streams = max(1, min(d.num_threads, plan.steps))
        ds = EpochStreams(plan, self._streams, position, ctx.quarantine.known_bad_samples(), ctx.aug,
                          ctx.num_classes, d.shuffle_buffer, d.seed, verify_samples=d.verify_samples)
        if d.num_threads == 0:
            self._it = iter(ds)
        elif position >= plan.steps:
            self._it = iter(())
        else:
            self._it = iter(DataLoader(
                ds, batch_size=None, num_workers=self._streams, prefetch_factor=d.prefetch,
                pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                worker_init_fn=functools.partial(_ignore_signals, ctx.cfg.train.preempt_signals)))
        self._plan = plan
        return position

    def stop(self) -> None:
        """Stop the workers, surely and boundedly: torch joins each for up to 5 s and then sends
        SIGTERM, which our workers ignore (see _ignore_signals); one still alive is SIGKILLed.
        Without that, Python's exit handler would join it forever when the rank fails."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)   # in-process and empty iterators have none
        if shutdown is None:
            return
        try:
            shutdown()
        finally:
            for w in getattr(it, "_workers", ()):
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)

    def state(self) -> dict:
        return {"streams": self._streams, "num_threads": self.ctx.cfg.data.num_threads}

    def compatible(self, state: dict | None) -> bool:
        # The streams (and so the order within the epoch) depend on the worker count.
        return state is None or state.get("num_threads") == self.ctx.cfg.data.num_threads

    def next_batch(self, position: int) -> RawBatch:
        plan = self._plan
        try:
            batch = next(self._it)
        except StopIteration:
            raise DataLoaderError(f"rank {self.ctx.rank}: the PIL fallback ran dry at step {position} of "
                                  f"{plan.steps} in epoch {plan.epoch}") from None
        if batch["index"] != position:
            raise DataLoaderError(f"rank {self.ctx.rank}: batch {batch['index']} arrived at step {position} "
                                  f"(DataLoader worker order broken)")
        if batch["bad"]:
            self.ctx.quarantine.record_samples(batch["bad"], plan.epoch)
        return RawBatch(batch["images"], batch["jitter"], batch["labels"], batch["keys"], batch["positions"],
                        batch["copies"])
