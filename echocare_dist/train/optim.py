"""Optimizer, LR schedule and the DeepSpeed config, all derived from our config (one source of truth).

DeepSpeed gets a client optimizer (torch AdamW over the model's no-decay groups) and a client
scheduler; its JSON config only carries what DeepSpeed itself owns: batch geometry, ZeRO,
precision and clipping. The JSON is written next to the run so a run can be audited.
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..config import Config
from ..schedule import warmup_cosine


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.micro_batch * cfg.train.grad_accum * world_size


def scaled_lr(cfg: Config, world_size: int) -> tuple[float, float]:
    """Peak and floor LR for this global batch (linear scaling rule from optim.lr_batch_ref)."""
    scale = global_batch(cfg, world_size) / cfg.optim.lr_batch_ref
    return cfg.optim.lr * scale, cfg.optim.min_lr * scale


class WarmupCosine(LRScheduler):
    """The project's schedule (echocare_dist.schedule.warmup_cosine) as the client scheduler
    DeepSpeed steps and checkpoints. Stateless apart from the step count, so its state_dict
    round-trips through DeepSpeed checkpoints exactly."""

    def __init__(self, optimizer, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 schedule: str = "cosine", last_epoch: int = -1):
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps, self.schedule)

    def get_lr(self):
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        # Only the position is restored: peak/floor/warmup/total come from the current config, so
        # extending train.steps or changing the world size on resume reshapes the schedule.
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self.apply()

    def apply(self) -> None:
        """Write the LR of the current step into the optimizer (a restored optimizer state carries
        the LR of the run that saved it, e.g. at another world size)."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def build_optimizer(model: torch.nn.Module, cfg: Config, world_size: int, device: torch.device):
    from ..models import param_groups

    peak, floor = scaled_lr(cfg, world_size)
    o = cfg.optim
    # Fused AdamW needs its state on a GPU; with ZeRO-Offload the state lives on the host.
    fused = bool(o.fused and device.type == "cuda" and not cfg.train.offload_optimizer)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak, betas=tuple(o.betas),
                                  eps=o.eps, fused=fused or None)
    scheduler = WarmupCosine(optimizer, peak, floor, o.warmup_steps, cfg.train.steps, o.schedule)
    return optimizer, scheduler


# Derived ZeRO buckets: an eighth of the model, clamped to 2e7..5e7 elements. A bucket is reduced
# when it fills during backward, so it must be several times smaller than the gradients for
# communication to overlap the rest of backward (Swin-L, 195 M: ~2.4e7, 8 buckets); above 5e7 the
# overlap is lost for no gain in bandwidth (NCCL saturates far below that), under 2e7 launches
# dominate. Each bucket costs 2 buffers of this many elements per rank and communication dtype.
BUCKET_MIN, BUCKET_MAX, BUCKETS_PER_MODEL = 20_000_000, 50_000_000, 8


def bucket_sizes(cfg: Config, n_params: int | None) -> dict[str, int]:
    """ZeRO's reduce / allgather / ZeRO-3 prefetch buckets in elements: the train.* value, or
    derived from the model when it is 0 (n_params None: the upper bound)."""
    t = cfg.train
    derived = BUCKET_MAX if n_params is None else min(BUCKET_MAX, max(BUCKET_MIN, n_params // BUCKETS_PER_MODEL))
    reduce = t.reduce_bucket_size or derived
    return {"reduce": reduce, "allgather": t.allgather_bucket_size or reduce,
            "prefetch": t.prefetch_bucket_size or reduce}


def deepspeed_config(cfg: Config, world_size: int, device: torch.device, load_universal: bool = False,
                     n_params: int | None = None) -> dict:
    t = cfg.train
    on_gpu = device.type == "cuda"
    buckets = bucket_sizes(cfg, n_params)
    zero: dict = dict(stage=t.zero_stage)
    if t.zero_stage >= 1:
        zero.update(overlap_comm=bool(t.overlap_comm and on_gpu), contiguous_gradients=True,
                    reduce_bucket_size=buckets["reduce"], allgather_bucket_size=buckets["allgather"])
        if t.offload_optimizer:
            zero["offload_optimizer"] = dict(device="cpu", pin_memory=on_gpu)
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=buckets["prefetch"],
                    stage3_gather_16bit_weights_on_model_save=False)
    ds = {
        "train_batch_size": global_batch(cfg, world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed defaults to 1.0; ours is the paper's value from optim.grad_clip (0 = off).
        "gradient_clipping": cfg.optim.grad_clip,
        # Our own logger reports every train.log_every; DeepSpeed's print (None in code) is aligned to it.
        "steps_per_print": t.log_every,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        # The client torch AdamW stays in charge even with ZeRO-Offload.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
    if t.precision in ("bf16", "fp16"):
        # Both through torch.autocast inside the engine's forward, over fp32 weights: the model,
        # its fp32 master copy and the checkpoints stay one dtype. Not DeepSpeed's "fp16" section,
        # which halves the weights (and with auto_cast off crashes at the first conv). For fp16
        # DeepSpeed adds a dynamic loss scaler (torch.amp.GradScaler) to ZeRO 0-3 itself.
        # The gradients are those of fp32 parameters. By default DeepSpeed reduces the gradients
        # of its "lower precision safe modules" (Linear, Conv) in the autocast dtype and the rest in
        # fp32: two communication dtypes, two sets of ZeRO buckets. We reduce everything in fp32
        # (an empty module list): one bucket set, and an exact sum over ranks instead of a sum of
        # values rounded to 8 mantissa bits; the cost, 2x the bytes of a bf16 reduction, overlaps
        # backward with the derived buckets (docs/cluster.md, "Communication").
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if t.precision == "bf16" else "float16",
                                "lower_precision_safe_modules": []}
    return ds

