"""The pretraining loader: an epoch cursor over a reader, and the batch contract.

A loader is an infinite iterator of micro-batches. Epoch e runs exactly `steps_per_epoch` batches
on every rank (see shards.py for the plan), then epoch e+1 starts with a new order; the trainer
simply calls next() for as many steps as it trains. The position is (epoch, batches returned in
the epoch) and `state_dict()` describes the state after the last batch returned, so
"N steps, save, restart, M steps" returns the same samples as N+M uninterrupted steps
(resume.py says when a saved state cannot continue exactly).

The loader owns that cursor and the batch finishing; reading is the `Reader`'s (contracts.py:
DALI in dali_loader.py, PIL in pil_loader.py), damaged data the `QuarantinePolicy`'s.

Batch (docs/architecture.md): target (B,1,H,W) float32 in [0,1]; input = (target - norm_mean) /
norm_std; mask (B,H/p,W/p) uint8 (1 = masked); labels (B,C) int8; keys list[str]; all tensors on
the training device. The mask is a function of (data.seed, epoch, key), see masking.py.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from .augment import AugmentParams, apply_jitter
from .contracts import RawBatch, Reader, ReaderContext
from .masking import MaskGenerator
from .quarantine import QuarantinePolicy
from .resume import STATE_VERSION, check_version, resume_mismatch
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
        self.epoch = 0
        self.position = 0
        self._plan = self._new_plan(0)
        self._resume = None      # reader state to apply when the epoch's reader starts
        self._active = False
        self.restarted_epoch = False  # set by load_state_dict when the saved position could not be kept
        self.reader = reader_class(ReaderContext(
            cfg=cfg, shard_set=self.shard_set, quarantine=self.quarantine, rank=rank, world_size=world_size,
            device=self.device, micro_batch=self.micro_batch, num_classes=len(ontology),
            aug=AugmentParams.from_config(cfg)))

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
        self.start()
        raw = self.reader.next_batch(self.position)
        self.position += 1
        return self._finish(raw)

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

    def _finish(self, raw: RawBatch) -> dict:
        """The reader's uint8 images and jitter factors -> the batch contract, on the device."""
        target = apply_jitter(raw.images.to(self.device, non_blocking=True), torch.as_tensor(raw.jitter))
        mean, std = self._norm
        return dict(target=target, input=(target - mean).div_(std),
                    mask=self.masks.token_masks(raw.keys, self.epoch, self.device),
                    labels=torch.as_tensor(raw.labels).to(self.device, non_blocking=True), keys=list(raw.keys))

    def _new_plan(self, epoch: int, excluded: set[str] | None = None) -> EpochPlan:
        if excluded is None:
            excluded = self.quarantine.shards_to_leave_out(epoch)
        self.quarantine.check_limit(excluded)
        return make_plan(self.shard_set, excluded, epoch=epoch, seed=self.cfg.data.seed, rank=self.rank,
                         world_size=self.world_size, micro_batch=self.micro_batch)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "loader": self.kind, "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size, "rank": self.rank, "seed": self.cfg.data.seed,
                "micro_batch": self.micro_batch, "steps_per_epoch": self._plan.steps,
                "excluded": list(self._plan.excluded), **self.quarantine.state(),
                "reader": self.reader.state() if self._active else self._resume}

    def load_state_dict(self, state: dict) -> None:
        self._stop()
        check_version(state)
        self.quarantine.load_state(state)
        epoch, position = int(state["epoch"]), int(state["position"])
        why, plan = resume_mismatch(state, kind=self.kind, world_size=self.world_size, seed=self.cfg.data.seed,
                                    micro_batch=self.micro_batch, reader=self.reader, shard_set=self.shard_set,
                                    plan_for=lambda excluded: self._new_plan(epoch, excluded))
        if why is not None:
            log.warning("rank %d: %s: restarting epoch %d from its first step with a new seed and sample "
                        "order; samples seen in the first %d steps of this epoch may be seen again",
                        self.rank, why, epoch, position)
            self.epoch, self.position, self._resume = epoch, 0, None
            self._plan = self._new_plan(epoch)
            self.restarted_epoch = True
            return
        self.epoch, self.position, self._plan = epoch, position, plan
        self._resume = state.get("reader")
        self.restarted_epoch = False
