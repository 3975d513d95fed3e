"""What both pretraining loaders share: epochs, resume state, quarantine, and the batch contract.

A loader is an infinite iterator of micro-batches. Epoch e runs exactly `steps_per_epoch` batches
on every rank (see shards.py for the plan), then epoch e+1 starts with a new order; the trainer
simply calls next() for as many steps as it trains. The position is (epoch, batches returned in
the epoch) and `state_dict()` describes the state after the last batch returned, so
"N steps, save, restart, M steps" returns the same samples as N+M uninterrupted steps.

Batch (docs/architecture.md): target (B,1,H,W) float32 in [0,1]; input = (target - norm_mean) /
norm_std; mask (B,H/p,W/p) uint8 (1 = masked); labels (B,C) int8; keys list[str]; all tensors on
the training device. The mask is a function of (data.seed, epoch, key), see masking.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .augment import AugmentParams, apply_jitter
from .masking import MaskGenerator
from .quarantine import Quarantine
from .shards import DataLoaderError, EpochPlan, ShardSet, make_plan

log = logging.getLogger("echocare_dist.data")

STATE_VERSION = 1


class PretrainLoader:
    kind = "base"

    def __init__(self, cfg, ontology, *, rank: int, world_size: int, device, run_dir: str | os.PathLike | None):
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.micro_batch = cfg.train.micro_batch
        self.run_dir = Path(run_dir) if run_dir else None
        self.shard_set = ShardSet.open(cfg.resolve_path(cfg.data.shards), ontology)
        self.num_classes = len(ontology)
        self.masks = MaskGenerator.from_config(cfg)
        self.aug = AugmentParams.from_config(cfg)
        self._norm = (float(cfg.data.augment.norm_mean), float(cfg.data.augment.norm_std))
        self._quarantine = Quarantine(run_dir)
        self._dir = str(self.shard_set.root.resolve())
        self._runtime_quarantined: set[str] = set()   # shards this rank found damaged
        self._bad_keys: set[str] = set()               # "shard/key" of samples found damaged
        self.bad_samples = 0
        self.epoch = 0
        self.position = 0
        self._plan = self._new_plan(0)
        self._resume = None      # reader state to apply when the epoch's reader starts
        self._active = False
        self.restarted_epoch = False  # set by load_state_dict when the saved position could not be kept

    # ------------------------------------------------------------------ public views
    @property
    def steps_per_epoch(self) -> int:
        return self._plan.steps

    @property
    def quarantined(self) -> list[str]:
        """Shard names left out of the current epoch (damaged at build time or found at run time)."""
        return sorted(set(self._plan.excluded) | self._runtime_quarantined)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch * self.world_size * self.cfg.train.grad_accum

    @property
    def plan(self) -> EpochPlan:
        return self._plan

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
        if not self._active:
            self._start_reader(self._resume)
            self._resume = None
            self._active = True
        images, jitter, labels, keys = self._next_raw()
        self.position += 1
        return self._finish(images, jitter, labels, keys)

    def close(self) -> None:
        self._stop()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _stop(self) -> None:
        if self._active:
            self._stop_reader()
            self._active = False

    def _finish(self, images: torch.Tensor, jitter: torch.Tensor, labels, keys: list[str]) -> dict:
        """uint8 (B,1,H,W) images + (B,2) jitter factors from the reader -> the batch, on the device."""
        target = apply_jitter(images.to(self.device, non_blocking=True), torch.as_tensor(jitter))
        mean, std = self._norm
        return dict(target=target, input=(target - mean).div_(std),
                    mask=self.masks.token_masks(keys, self.epoch, self.device),
                    labels=torch.as_tensor(labels).to(self.device, non_blocking=True), keys=list(keys))

    # ------------------------------------------------------------------ plan and quarantine
    def _known(self, section: str) -> set[str]:
        entries = self._quarantine.read()[section]
        return {name for name, info in entries.items() if info.get("dir", self._dir) == self._dir}

    def _new_plan(self, epoch: int, excluded=None) -> EpochPlan:
        if excluded is None:
            known = (self._known("shards") | self._runtime_quarantined) & set(self.shard_set.by_name)
            fresh = self.shard_set.preflight(s for s in self.shard_set.shards if s.name not in known)
            if fresh:
                self._record_shards({name: {"reason": reason} for name, reason in fresh.items()}, epoch)
            excluded = known | set(fresh)
        self._check_quarantine_limit(excluded)
        return make_plan(self.shard_set, excluded, epoch=epoch, seed=self.cfg.data.seed, rank=self.rank,
                         world_size=self.world_size, micro_batch=self.micro_batch)

    def _check_quarantine_limit(self, excluded) -> None:
        n, total = len(set(excluded)), len(self.shard_set.shards)
        if n and n > self.cfg.data.max_quarantine_fraction * total:
            where = self._quarantine.path or "the log above"
            raise DataLoaderError(
                f"{n} of {total} shards in {self.shard_set.root} are damaged (data.max_quarantine_fraction="
                f"{self.cfg.data.max_quarantine_fraction}): that looks systematic (storage, copy, driver); "
                f"see {where}")

    def _record_shards(self, found: dict[str, dict], epoch: int | None = None) -> None:
        for name, info in found.items():
            log.warning("rank %d: quarantining shard %s/%s: %s%s", self.rank, self.shard_set.root, name,
                        info.get("reason"), f" (sample {info['key']})" if info.get("key") else "")
            info.update(dir=self._dir, rank=self.rank, epoch=self.epoch if epoch is None else epoch, loader=self.kind)
        self._runtime_quarantined |= set(found)
        self._quarantine.add(shards=found)

    def _record_samples(self, bad: list[tuple[str, str, str]]) -> None:
        """Count and record damaged samples (shard name, key, reason); each is counted once."""
        new = {}
        for shard, key, reason in bad:
            tag = f"{shard}/{key}"
            if tag in self._bad_keys:
                continue
            self._bad_keys.add(tag)
            new[tag] = dict(shard=shard, key=key, reason=reason, dir=self._dir, rank=self.rank, epoch=self.epoch,
                            loader=self.kind)
            log.warning("rank %d: skipping damaged sample %s: %s", self.rank, tag, reason)
        if new:
            self.bad_samples += len(new)
            self._quarantine.add(samples=new)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "loader": self.kind, "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size, "rank": self.rank, "seed": self.cfg.data.seed,
                "micro_batch": self.micro_batch, "steps_per_epoch": self._plan.steps,
                "excluded": list(self._plan.excluded), "quarantined": sorted(self._runtime_quarantined),
                "bad_samples": self.bad_samples, "bad_keys": sorted(self._bad_keys),
                "reader": self._reader_state() if self._active else self._resume}

    def load_state_dict(self, state: dict) -> None:
        self._stop()
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataLoaderError(f"unsupported loader state (version {state.get('version') if isinstance(state, dict) else state!r}); "
                                  f"expected version {STATE_VERSION}")
        self.bad_samples = int(state.get("bad_samples", 0))
        self._bad_keys = set(state.get("bad_keys", []))
        self._runtime_quarantined |= set(state.get("quarantined", []))
        epoch, position = int(state["epoch"]), int(state["position"])
        why = None
        if state["world_size"] != self.world_size:
            why = f"world size changed from {state['world_size']} to {self.world_size}"
        elif state["loader"] != self.kind:
            why = f"the state was saved by the {state['loader']!r} loader, this is {self.kind!r}"
        elif state["seed"] != self.cfg.data.seed or state["micro_batch"] != self.micro_batch:
            why = "data.seed or train.micro_batch changed"
        elif not self._reader_state_compatible(state.get("reader")):
            why = "the reader settings changed (data.num_threads)"
        plan = None
        if why is None:
            excluded = set(state["excluded"])
            damaged = self.shard_set.preflight(s for s in self.shard_set.shards if s.name not in excluded)
            if damaged:
                why = f"shard(s) {sorted(damaged)} were damaged since the save"
            else:
                plan = self._new_plan(epoch, excluded=excluded)
                if plan.steps != state["steps_per_epoch"]:
                    why = f"the epoch now has {plan.steps} steps, the saved one had {state['steps_per_epoch']}"
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

    # ------------------------------------------------------------------ reader hooks
    def _start_reader(self, resume) -> None:
        raise NotImplementedError

    def _stop_reader(self) -> None:
        raise NotImplementedError

    def _next_raw(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | torch.Tensor, list[str]]:
        """uint8 images (B,1,H,W), jitter factors (B,2), int8 labels (B,C), keys of the next batch."""
        raise NotImplementedError

    def _reader_state(self):
        return None

    def describe(self) -> str:
        return self.kind

    def _reader_state_compatible(self, reader_state) -> bool:
        return True


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader_kind(cfg, device) -> str:
    """`data.loader`; "auto" = DALI when it can decode on the GPU, else the PIL fallback.

    On CPU the fallback is the cheaper of the two (benchmarks/loader.py: DALI's CPU decode is faster
    than PIL's, but its antialiased CPU resize costs ~2.7 ms per 640x480 image against ~0.4 ms)."""
    kind = cfg.data.loader
    if kind != "auto":
        return kind
    on_gpu = cfg.data.device == "gpu" or (cfg.data.device == "auto" and torch.device(device).type == "cuda")
    return "dali" if dali_available() and on_gpu and torch.cuda.is_available() else "wds"


def build_loader(cfg, ontology, *, rank: int, world_size: int, device, run_dir: str | os.PathLike | None) -> PretrainLoader:
    """The pretraining loader of `cfg.data.loader` (see `resolve_loader_kind` for "auto")."""
    kind = resolve_loader_kind(cfg, device)
    if kind == "dali":
        if not dali_available():
            raise DataLoaderError("data.loader=dali but nvidia-dali is not installed; use data.loader=wds or auto")
        from .dali_loader import DaliLoader
        loader = DaliLoader(cfg, ontology, rank=rank, world_size=world_size, device=device, run_dir=run_dir)
    else:
        from .pil_loader import PilLoader
        loader = PilLoader(cfg, ontology, rank=rank, world_size=world_size, device=device, run_dir=run_dir)
    log.info("rank %d/%d: %s loader over %d shards (%d samples, %d quarantined), %d steps per epoch of "
             "micro-batch %d", rank, world_size, loader.describe(), len(loader.shard_set.shards),
             loader.plan.total, len(loader.quarantined), loader.steps_per_epoch, loader.micro_batch)
    return loader
