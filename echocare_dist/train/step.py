"""What one optimizer step needs, and the step itself.

The training loop (trainer.py), benchmarks/train_step.py and the export tests all build and run
the model through these two functions, so a published figure describes the real trainer:

    build_components(cfg, env) -> Components   DeepSpeed engine over the model, client AdamW and
                                                schedule, loss, loader, FLOPs, the device's peak
    train_step(components)     -> StepResult   train.grad_accum micro-batches, one optimizer update

Neither touches the run's bookkeeping (checkpoints, tracking, metrics file, preemption).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..config import Config
from ..data import PretrainLoaderProtocol, build_loader, resolve_loader_kind
from ..data.placement import decode_on_gpu
from ..hardware import peak_tflops
from ..kernels.functional import describe_impl
from ..models import build_model, flops_per_image
from ..models.compile import apply_compile
from ..ontology import Ontology, load_ontology
from . import distributed
from .hpm import HardPatchMiner
from .loss import PretrainLoss
from .nonfinite import install_guard, poison_scale, step_skipped
from .optim import WarmupCosine, bucket_sizes, build_optimizer, deepspeed_config, global_batch

log = logging.getLogger(__name__)

DS_CONFIG_FILE = "deepspeed_config.json"


@dataclass
class Components:
    cfg: Config
    env: distributed.DistEnv
    ontology: Ontology
    engine: Any                        # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer   # as returned by deepspeed.initialize (ZeRO wraps the AdamW)
    scheduler: WarmupCosine
    loader: PretrainLoaderProtocol
    loss_fn: PretrainLoss
    flops: dict                        # models.flops_per_image: "forward", "train" per image
    n_params: int
    ds_config: dict
    global_batch: int
    peak_tflops: float                 # per device, for MFU
    peak_source: str                   # where peak_tflops came from
    compile: str = "none"              # model.compile as applied: none | blocks | full
    miner: HardPatchMiner | None = None  # mask.strategy=hpm: re-chooses each micro-batch's mask


@dataclass
class StepResult:
    """Means over the step's micro-batches, still on the device (reading them would sync it)."""
    loss: torch.Tensor
    mim: torch.Tensor
    hie: torch.Tensor
    data_wait_s: float                 # time spent waiting for the loader, summed over micro-batches
    lr: float                          # the LR this step's update used
    batch: dict                        # the last micro-batch and the model's output on it
    out: dict
    skipped: bool = False              # not applied: non-finite loss or gradient norm (nonfinite.py)


def build_components(cfg: Config, env: distributed.DistEnv, *, ontology: Ontology | None = None,
                     run_dir: Path | None = None, load_universal: bool = False) -> Components:
    """Collective (deepspeed.initialize). `run_dir` receives the loader's quarantine records and,
    from rank 0, the DeepSpeed config; `load_universal` prepares the engine for a universal checkpoint.

    The order of the seeding below is part of the checkpoint contract: a resumed run rebuilds the
    same weights and then restores the per-rank streams drawn from afterwards."""
    import deepspeed

    if ontology is None:
        ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
    distributed.configure_determinism(cfg.train.deterministic)
    # Same seed on every rank: identical initial weights (ZeRO-3 partitions what each rank built).
    distributed.seed_everything(cfg.train.seed)
    hpm = cfg.mask.strategy == "hpm"
    model = build_model(cfg.model, len(ontology), hpm_units=cfg.model.img_size // cfg.mask.mask_patch_size if hpm else 0)
    flops = flops_per_image(cfg.model, len(ontology), hpm=hpm)
    n_params = sum(p.numel() for p in model.parameters())
    compiled = apply_compile(model, cfg.model.compile, env.device)  # in place: state_dict keys unchanged
    optimizer, scheduler = build_optimizer(model, cfg, env.world_size, env.device)
    ds_config = deepspeed_config(cfg, env.world_size, env.device, load_universal=load_universal,
                                 n_params=n_params)
    if env.is_main and run_dir is not None:
        path = Path(run_dir) / DS_CONFIG_FILE
        atomic_write_json(path, ds_config)  # before initialize: a failing start leaves it to read
        log.info("DeepSpeed config (%s): %s", path, ds_config)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    # ZeRO-0 fp32 runs our AdamW without DeepSpeed's overflow check: give it the same skip.
    install_guard(engine.optimizer)
    loss_fn = PretrainLoss(cfg, ontology)
    loader = build_loader(cfg, ontology, rank=env.rank, world_size=env.world_size, device=env.device,
                          run_dir=run_dir)
    # Per-rank stream for stochastic depth etc.; a resume on the same world size restores it exactly.
    distributed.seed_everything(cfg.train.seed + 1 + env.rank)
    peak, peak_source = peak_tflops(env.device, cfg.train.precision, cfg.train.peak_tflops)
    c = Components(cfg=cfg, env=env, ontology=ontology, engine=engine, optimizer=optimizer,
                   scheduler=scheduler, loader=loader, loss_fn=loss_fn, flops=flops, n_params=n_params,
                   ds_config=ds_config, global_batch=global_batch(cfg, env.world_size),
                   peak_tflops=peak, peak_source=peak_source, compile=compiled,
                   miner=HardPatchMiner(cfg, env.rank) if hpm else None)
    if env.is_main:
        log.info("%s", startup_line(c))
    return c


def startup_line(c: Components) -> str:
    """The one line that says what this run really runs on: a CUDA job that fell back to the CPU,
    PIL or the reference losses shows it here."""
    cfg, device = c.cfg, c.env.device
    kind = resolve_loader_kind(cfg, device)
    decode = "gpu" if kind == "dali" and decode_on_gpu(cfg.data, device) else "cpu"
    b = bucket_sizes(cfg, c.n_params)
    buckets = "-" if cfg.train.zero_stage == 0 else f"reduce {b['reduce']:.3g} / allgather {b['allgather']:.3g}"
    if cfg.train.zero_stage == 3:
        buckets += f" / prefetch {b['prefetch']:.3g}"
    precision = cfg.train.precision + (" autocast, fp32 reduction" if cfg.train.precision != "fp32" else "")
    overlap = c.ds_config["zero_optimization"].get("overlap_comm", False)
    return (f"start: device {device} ({c.env.world_size} rank(s), {c.env.launcher}) | loader {kind}, decode on "
            f"{decode} | loss kernels {describe_impl(cfg.loss.impl, device)} | precision {precision} | "
            f"ZeRO-{cfg.train.zero_stage} | buckets {buckets} elements, overlap {'on' if overlap else 'off'} | "
            f"compile {c.compile}")


def train_step(c: Components, *, nan_loss: bool = False) -> StepResult:
    """One optimizer update over train.grad_accum micro-batches (DeepSpeed steps once at the boundary),
    skipped on every rank when any rank's loss or the global gradient norm is not finite.
    `nan_loss` is the fault injection of the tests (faults.py: $ECHOCARE_FAULT=nan@...)."""
    engine, accum = c.engine, c.cfg.train.grad_accum
    skipped_before = engine.skipped_steps
    total = mim_sum = hie_sum = None
    data_wait = 0.0
    lr = c.optimizer.param_groups[0]["lr"]
    for micro in range(accum):
        t0 = time.perf_counter()
        with _isolated_rng(c.env.device):
            batch = next(c.loader)  # an infinite iterator (echocare_dist.data contract)
        data_wait += time.perf_counter() - t0
        if c.miner is not None:
            batch = c.miner.remask(engine, batch, engine.global_steps, micro)
        out = engine(batch["input"], batch["mask"])
        loss, mim, hie = c.loss_fn(out, batch)
        if nan_loss:
            loss = loss * math.nan
        engine.backward(loss * poison_scale(loss))
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
        mim_sum = mim.detach() if mim_sum is None else mim_sum + mim.detach()
        hie_sum = hie.detach() if hie_sum is None else hie_sum + hie.detach()
    skipped = step_skipped(engine, skipped_before, c.cfg.train.precision,
                           float(c.ds_config.get("fp16", {}).get("min_loss_scale", 1.0)))
    return StepResult(total / accum, mim_sum / accum, hie_sum / accum, data_wait, lr, batch, out, skipped)


def _isolated_rng(device: torch.device):
    """The loader has its own seeded randomness; whatever it draws from torch's global streams
    (a reader starting lazily after a resume does) must not shift stochastic depth."""
    devices = [device.index] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
