"""The progressive schedule (train.stages, docs/hpm.md): the stage of a step, and the switch.

The stage in force is a pure function of the step, so a resumed run needs no new checkpoint
state: `StageSchedule.enter(components, step)` brings a freshly built (or restored) run to the
stage of `step`, the same call the loop makes at a boundary.

What a switch changes, and why each is safe mid-run:
- model: the Swin's input size (models/mim.py `set_input_size`): buffers only (attention masks,
  grid bookkeeping); config validation guarantees no parameter changes shape, so the ZeRO
  partitions and the optimizer state stay as they are;
- loader: rebuilt for the stage's image size / mask ratio and resumed from every rank's state
  of the old one (data/resume.py), exactly as from a checkpoint: the epoch and its consumed
  positions continue, nothing is restarted or skipped;
- loss: the weight of L_HIE; FLOPs per image (MFU) for the stage's size.
Validation keeps model.img_size (`at_model_size`): its losses stay comparable across stages.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config
from ..data import build_loader
from ..models import flops_per_image
from . import distributed
from .sample_log import wrap_from_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    index: int
    first_step: int
    last_step: Optional[int]   # inclusive; None = to the end of the run
    img_size: int
    mask_ratio: float
    hie_weight: float

    @property
    def settings(self) -> tuple[int, float, float]:
        return self.img_size, self.mask_ratio, self.hie_weight


def resolve_stages(cfg: Config) -> tuple[Stage, ...]:
    """train.stages with every null replaced by its base value; no stages = one, the base values."""
    base = (cfg.model.img_size, cfg.mask.mask_ratio, cfg.loss.hie_weight)
    if not cfg.train.stages:
        return (Stage(0, 1, None, *base),)
    out, first = [], 1
    for i, s in enumerate(cfg.train.stages):
        values = [b if v is None else v for v, b in zip((s.img_size, s.mask_ratio, s.hie_weight), base)]
        out.append(Stage(i, first, s.until_step, int(values[0]), float(values[1]), float(values[2])))
        first = (s.until_step or 0) + 1
    return tuple(out)


def stage_at(stages: tuple[Stage, ...], step: int) -> Stage:
    """The stage that trains optimizer step `step` (1-based)."""
    for stage in stages:
        if stage.last_step is None or step <= stage.last_step:
            return stage
    return stages[-1]  # validation makes the last stage reach train.steps; a longer run keeps it


def stage_config(cfg: Config, stage: Stage) -> Config:
    """A copy of `cfg` with the stage's values in the base keys: what the loader and FLOPs read."""
    out = copy.deepcopy(cfg)
    out.model.img_size, out.mask.mask_ratio, out.loss.hie_weight = stage.settings
    return out


class StageSchedule:
    def __init__(self, cfg: Config, env: distributed.DistEnv, run_dir=None):
        """`run_dir`: where the loaders keep their quarantine records (build_components' run_dir)."""
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.stages = resolve_stages(cfg)
        self.current: Stage | None = None
        # What build_components built: the base values.
        self.applied = (cfg.model.img_size, cfg.mask.mask_ratio, cfg.loss.hie_weight)

    def is_last_step(self, step: int) -> bool:
        """`step` ends a stage before the run's end: the loop logs there, so that no metrics window
        mixes two stages' image sizes (and FLOPs)."""
        stage = stage_at(self.stages, step)
        return stage.last_step == step and stage is not self.stages[-1]

    def enter(self, c, step: int) -> Stage:
        """Apply the stage of `step` to the components `c` (step.Components) if it is not in force.
        Collective when the loader is rebuilt (every rank's state is gathered); every rank calls it
        at the same step, since the stage is a function of the step alone."""
        stage = stage_at(self.stages, step)
        if stage is self.current:
            return stage
        img, ratio, weight = stage.settings
        old_img, old_ratio, old_weight = self.applied
        staged = stage_config(self.cfg, stage)
        devices = [self.env.device.index] if self.env.device.type == "cuda" else []
        # Building readers may draw from torch's global streams; the restored ones belong to training.
        with torch.random.fork_rng(devices=devices):
            if img != old_img:
                c.engine.module.set_input_size(img)
            if (img, ratio) != (old_img, old_ratio):
                c.loader = self._rebuild_loader(c, staged)
        if weight != old_weight:
            c.loss_fn.hie_weight = weight
            c.loss_fn.use_hie = self.cfg.model.hie_head and weight > 0
        c.flops = flops_per_image(staged.model, len(c.ontology), hpm=self.cfg.mask.strategy == "hpm")
        self.applied, self.current = stage.settings, stage
        if self.env.is_main and len(self.stages) > 1:
            until = "the end" if stage.last_step is None else f"step {stage.last_step}"
            log.info("stage %d of %d from step %d to %s: img_size %d, mask_ratio %.3g, hie_weight %.3g, "
                     "%.3f GFLOP forward / image", stage.index, len(self.stages), step, until, img, ratio,
                     weight, c.flops["forward"] / 1e9)
        return stage

    def _rebuild_loader(self, c, staged: Config):
        """A loader for the stage's size and mask ratio at the old one's exact data position."""
        states = distributed.all_gather_object(c.loader.state_dict())
        c.loader.close()  # its workers / pipeline go before the new ones start
        loader = build_loader(staged, c.ontology, rank=self.env.rank, world_size=self.env.world_size,
                              device=self.env.device, run_dir=self.run_dir)
        loader.resume(states)
        return wrap_from_env(loader, self.env.rank)  # $ECHOCARE_SAMPLE_LOG appends to the same file

    @contextmanager
    def at_model_size(self, c):
        """The model at model.img_size for the duration (validation, probe), then back."""
        img = self.applied[0]
        if img == self.cfg.model.img_size:
            yield
            return
        module = c.engine.module
        module.set_input_size(self.cfg.model.img_size)
        try:
            yield
        finally:
            module.set_input_size(img)
