"""The pretraining loader: an epoch cursor over a reader, and the batch contract.

A loader is an infinite iterator of micro-batches. Epoch e runs exactly `steps_per_epoch` batches
on every rank (see shards.py for the plan), then epoch e+1 starts with a new order; the trainer
simply calls next() for as many steps as it trains. The position is (epoch, batches returned in
the epoch) and `state_dict()` describes the state after the last batch returned, so
"N steps, save, restart, M steps" returns the same samples as N+M uninterrupted steps. The state
also holds the epoch positions this rank consumed, so `resume(every rank's state)` on another world
size splits the epoch's unconsumed rest over the new ranks (resume.py says which of the two applies).

The loader owns that cursor and the batch finishing; reading is the `Reader`'s (contracts.py:
DALI in dali_loader.py, PIL in pil_loader.py), damaged data the `QuarantinePolicy`'s.

Batch (docs/architecture.md): target (B,1,H,W) float32 in [0,1]; input = (target - norm_mean) /
norm_std; mask (B,H/p,W/p) uint8 (1 = masked); labels (B,C) int8; keys list[str]; all tensors on
the training device. The mask is a function of (data.seed, epoch, key), see masking.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .augment import AugmentParams, apply_jitter
from .contracts import RawBatch, Reader, ReaderContext
from .listing import positions_from_ranges, ranges_from_positions
from .masking import MaskGenerator
from .mixture import SOURCES_FILE, Mixture, mixture_enabled
from .quarantine import QuarantinePolicy
from .resume import EXACT, RESTART, STATE_VERSION, decide
from .shards import EpochPlan, ShardSet, make_plan

log = logging.getLogger(__name__)


class PretrainLoader:
    """`reader_class` is a `Reader` class (its `kind` names the loader); `build_loader` in
    registry.py picks it from the config."""

    def __init__(self, cfg, ontology, reader_class: Callable[[ReaderContext], Reader], *, rank: int,
                 world_size: int, device, run_dir: str | os.PathLike | None):
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        self.kind: str = reader_class.kind
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.micro_batch = cfg.train.micro_batch
        self.shard_set = ShardSet.open(cfg.resolve_path(cfg.data.shards), ontology)
        self.quarantine = QuarantinePolicy(run_dir, self.shard_set, rank=rank, kind=self.kind,
                                           max_fraction=cfg.data.max_quarantine_fraction)
        self.masks = MaskGenerator.from_config(cfg)
        self._norm = (float(cfg.data.augment.norm_mean), float(cfg.data.augment.norm_std))
        d = cfg.data
        cache = Path(run_dir) / SOURCES_FILE if run_dir else None
        self.mixture = Mixture(self.shard_set, d, cache) if mixture_enabled(d) else None
        self.mixture_tag = None if self.mixture is None else {
            "weights": None if d.source_weights is None else {str(k): float(v) for k, v in sorted(d.source_weights.items())},
            "alpha": None if d.source_alpha is None else float(d.source_alpha)}
        self.epoch = 0
        self.position = 0
        self._plan = self._new_plan(0)
        self._consumed: np.ndarray | None = None   # bool per position of the epoch's list, read by this rank
        self.resumed_as: str | None = None         # resume.EXACT / SPLIT / RESTART after resume()
        self._resume = None      # reader state to apply when the epoch's reader starts
        self._active = False
        self.restarted_epoch = False  # set by load_state_dict when the saved position could not be kept
        self.reader = reader_class(ReaderContext(
            cfg=cfg, shard_set=self.shard_set, quarantine=self.quarantine, rank=rank, world_size=world_size,
            device=self.device, micro_batch=self.micro_batch, num_classes=len(ontology),
            aug=AugmentParams.from_config(cfg), consumed=lambda: self._consumed))

    # ------------------------------------------------------------------ public views
    @property
    def steps_per_epoch(self) -> int:
        return self._plan.steps

    @property
    def bad_samples(self) -> int:
        return self.quarantine.bad_samples

    @property
    def quarantined(self) -> list[str]:
        """Shard names left out of the current epoch (damaged at build time or found at run time)."""
        return sorted(set(self._plan.excluded) | self.quarantine.runtime_shards)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch * self.world_size * self.cfg.train.grad_accum

    @property
    def plan(self) -> EpochPlan:
        return self._plan

    def effective_mixture(self) -> dict[str, dict] | None:
        """Per source: samples, natural and configured share, samples per epoch (None: no mixture)."""
        if self.mixture is None:
            return None
        usable = [s for s in self.shard_set.shards if s.name not in set(self._plan.excluded)]
        return self.mixture.effective(usable)

    def consumed_positions(self) -> np.ndarray:
        """Positions of the current epoch's list this rank has returned since its split began."""
        return np.zeros(0, np.int64) if self._consumed is None else np.flatnonzero(self._consumed)

    def describe(self) -> str:
        return self.reader.describe()

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= self._plan.steps:
            self._stop()
            self.epoch += 1
            self.position = 0
            self._resume = None  # a saved reader state belongs to the finished epoch
            self._plan = self._new_plan(self.epoch)
            self._consumed = None
        self.start()
        raw = self.reader.next_batch(self.position)
        self.position += 1
        return self._finish(raw, self._mark_consumed(raw))

    def start(self) -> None:
        """Start reading the current epoch now; next() does it when needed."""
        if not self._active:
            self.position = self.reader.start(self._plan, self.position, self._resume)
            self._resume = None
            self._active = True

    def close(self) -> None:
        self._stop()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _stop(self) -> None:
        if self._active:
            self.reader.stop()
            self._active = False

    def _mark_consumed(self, raw: RawBatch) -> np.ndarray | None:
        """Record the batch's epoch positions; returns its mixture copy numbers (None: no repeats)."""
        listing = self._plan.listing
        if self._consumed is None:
            self._consumed = np.zeros(len(listing), bool)
        if raw.positions is None:
            return None
        positions = np.asarray(raw.positions, np.int64)
        known = positions[positions >= 0]
        self._consumed[known] = True
        if raw.copies is not None:
            return np.asarray(raw.copies)
        if listing.is_natural:
            return None
        copies = np.zeros(len(positions), np.int32)
        copies[positions >= 0] = listing.copies(known)
        return copies

    def _finish(self, raw: RawBatch, copies: np.ndarray | None = None) -> dict:
        """The reader's uint8 images and jitter factors -> the batch contract, on the device."""
        target = apply_jitter(raw.images.to(self.device, non_blocking=True), torch.as_tensor(raw.jitter))
        mean, std = self._norm
        return dict(target=target, input=(target - mean).div_(std),
                    mask=self.masks.token_masks(raw.keys, self.epoch, self.device, copies),
                    labels=torch.as_tensor(raw.labels).to(self.device, non_blocking=True), keys=list(raw.keys))

    def _new_plan(self, epoch: int, excluded: set[str] | None = None) -> EpochPlan:
        if excluded is None:
            excluded = self.quarantine.shards_to_leave_out(epoch)
        self.quarantine.check_limit(excluded)
        return make_plan(self.shard_set, excluded, epoch=epoch, seed=self.cfg.data.seed, rank=self.rank,
                         world_size=self.world_size, micro_batch=self.micro_batch, mixture=self.mixture)

    def _split_plan(self, *, epoch: int, excluded: set[str], order_world: int, consumed, consumed_ranges,
                    left_out) -> EpochPlan:
        """The part of epoch `epoch` (its list drawn without `excluded`, for `order_world` ranks) not
        yet `consumed`, without the `left_out` shards, split over this run's ranks."""
        self.quarantine.check_limit(set(excluded) | set(left_out))
        return make_plan(self.shard_set, excluded, epoch=epoch, seed=self.cfg.data.seed, rank=self.rank,
                         world_size=self.world_size, micro_batch=self.micro_batch, mixture=self.mixture,
                         order_world=order_world, consumed=consumed, consumed_ranges=consumed_ranges,
                         left_out=left_out)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        p = self._plan
        return {"version": STATE_VERSION, "loader": self.kind, "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size, "rank": self.rank, "seed": self.cfg.data.seed,
                "micro_batch": self.micro_batch, "steps_per_epoch": p.steps,
                "excluded": list(p.excluded), **self.quarantine.state(),
                # The data position in world-size-free terms (resume.py): the epoch's list, what this
                # rank consumed of it, and what was consumed before the current split.
                "order_world": p.order_world, "left_out": list(p.left_out), "mixture": self.mixture_tag,
                "consumed": ranges_from_positions(self.consumed_positions()),
                "consumed_before": [list(r) for r in p.consumed_before],
                "reader": self.reader.state() if self._active else self._resume}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own saved state (see `resume` for a checkpoint's full list)."""
        self.resume([state])

    def resume(self, states: Sequence[dict]) -> None:
        """Continue from a checkpoint's loader states, one per rank of the run that saved it, on any
        world size: exactly where this rank stopped when nothing changed, else the unconsumed rest
        of the epoch split over this run's ranks (resume.py)."""
        self._stop()
        states = list(states)
        own = states[self.rank] if len(states) == self.world_size else states[0]
        if isinstance(own, dict):
            self.quarantine.load_state(own)
        decision = decide(states, rank=self.rank, world_size=self.world_size, kind=self.kind,
                          seed=self.cfg.data.seed, micro_batch=self.micro_batch, reader=self.reader,
                          shard_set=self.shard_set, mixture_tag=self.mixture_tag,
                          plan_for=lambda e, ex: self._new_plan(e, ex), split_for=self._split_plan)
        self.resumed_as = decision.mode
        self.restarted_epoch = decision.mode == RESTART
        self.epoch = decision.epoch
        self._resume, self._consumed = None, None
        if decision.mode == EXACT:
            self.position, self._plan = decision.position, decision.plan
            self._resume = decision.reader_state
            mine = positions_from_ranges(own.get("consumed"))
            if len(mine):
                self._consumed = np.zeros(len(self._plan.listing), bool)
                self._consumed[mine] = True
            return
        self.position = 0
        if decision.mode == RESTART:
            log.warning("rank %d: %s: restarting epoch %d from its first step with a new seed and sample "
                        "order; samples seen in the first %d steps of this epoch may be seen again",
                        self.rank, decision.why, decision.epoch, int(own.get("position", 0)))
            self._plan = self._new_plan(decision.epoch)
            return
        self._plan = decision.plan
        if self.rank == 0:
            log.info("resuming epoch %d on %d rank(s) (%s): its %d unconsumed samples are split again, %d steps "
                     "of micro-batch %d per rank", self._plan.epoch, self.world_size, decision.why,
                     self._plan.total, self._plan.steps, self.micro_batch)
