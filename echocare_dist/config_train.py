"""The `train` section and its progressive schedule (`train.stages`, docs/hpm.md).

A stage overrides, from the step after the previous stage's `until_step` to its own, the input
size, the mask ratio and the weight of L_HIE; the stage in force is a pure function of the step
(train/stages.py applies it). `validate_stages` holds the checks that need the model and mask
sections: a stage's size must tile like model.img_size, and, when the sizes differ, every Swin
stage grid must hold a whole window at every size, because timm would otherwise shrink the
window and resize the relative-position tables (parameters) mid-run, which ZeRO cannot follow.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal, Optional

from .config_base import ConfigError, parse_device, require
from .models.archs import UnknownArchError, swin_layout

STAGE_FIELDS = ("img_size", "mask_ratio", "hie_weight")  # what a stage may override (null = the base value)


@dataclass
class StageConfig:
    until_step: Optional[int] = None   # last step of the stage (inclusive); null = to the end (last stage only)
    img_size: Optional[int] = None     # null = model.img_size
    mask_ratio: Optional[float] = None  # null = mask.mask_ratio
    hie_weight: Optional[float] = None  # null = loss.hie_weight

    def validate(self, prefix: str) -> None:
        require(self.until_step is None or self.until_step >= 1,
                f"{prefix}.until_step must be >= 1 (or null = to the end), got {self.until_step}")
        require(self.img_size is None or self.img_size > 0,
                f"{prefix}.img_size must be positive (or null = model.img_size), got {self.img_size}")
        require(self.mask_ratio is None or 0.0 <= self.mask_ratio <= 1.0,
                f"{prefix}.mask_ratio must be in [0, 1] (or null = mask.mask_ratio), got {self.mask_ratio}")
        require(self.hie_weight is None or self.hie_weight >= 0,
                f"{prefix}.hie_weight must be >= 0 (or null = loss.hie_weight), got {self.hie_weight}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1_000_000
    micro_batch: int = 32              # per rank
    grad_accum: int = 1
    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 0
    deterministic: bool = False
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    image_every: int = 5000
    resume: str = "auto"               # "auto" | "none" | path to a checkpoint dir
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    requeue_exit_code: int = 124       # documented: trainer exits with this after a preemption checkpoint
    # Step-control vote (train/control.py: preemption, peer failure, non-finite flags) every N steps;
    # 10 keeps a SIGTERM's checkpoint far inside Slurm's 600 s signal lead (reasoning in control.py).
    preempt_check_every: int = 10
    max_bad_steps: int = 5             # consecutive skipped NaN/Inf steps before the run stops (exit code 3)
    offload_optimizer: bool = False    # ZeRO-Offload of optimizer state to CPU (needs zero_stage >= 1)
    dist_timeout_s: int = 1800
    overlap_comm: bool = True          # overlap gradient reduction with backward (GPU only)
    device: str = "auto"               # auto | cuda | cpu | cuda:N (one process); gpu = cuda; auto: $ECHOCARE_DEVICE, else CUDA if usable
    # ZeRO bucket sizes in elements; 0 = derived from the model (train/optim.py: bucket_sizes).
    reduce_bucket_size: int = 0
    allgather_bucket_size: int = 0     # 0 = reduce_bucket_size (derived or set)
    prefetch_bucket_size: int = 0      # ZeRO-3 parameter prefetch; 0 = reduce_bucket_size
    peak_tflops: float = 0.0           # per device for MFU; 0 = GPU spec table, or measured on CPU
    universal_workers: int = 2         # processes for the world-size-change checkpoint conversion
    # Validation (train/validation.py, docs/validation.md) every N steps on data.val_shards; 0 = off.
    # A validation step is also a log step: its figures join that step's metrics.jsonl record.
    val_every: int = 1000
    val_samples: int = 1024            # the fixed validation subset (all of a smaller val set)
    val_batch: int = 0                 # per rank; 0 = micro_batch
    val_seed: int = 0                  # the subset and its masks; independent of every training stream
    val_knn_k: int = 10                # neighbours of the k-NN probe (never from the query's own group)
    val_patience: int = 5              # warn after this many validations without a new best loss; 0 = never
    # Progressive schedule (docs/hpm.md): stages in step order, each overriding img_size / mask_ratio /
    # hie_weight up to its until_step; () = one stage, the base values, for the whole run.
    stages: tuple[StageConfig, ...] = ()

    def validate(self, prefix: str = "train") -> None:
        require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage must be 0..3, got {self.zero_stage}")
        for k in ("micro_batch", "grad_accum", "steps", "log_every", "ckpt_every", "image_every", "keep_last",
                  "preempt_check_every", "max_bad_steps", "dist_timeout_s"):
            require(getattr(self, k) > 0, f"{prefix}.{k} must be positive, got {getattr(self, k)}")
        require(not self.offload_optimizer or self.zero_stage >= 1,
                f"{prefix}.offload_optimizer=true needs {prefix}.zero_stage >= 1, got {self.zero_stage}")
        require(self.requeue_exit_code not in (0, 1) and 0 < self.requeue_exit_code < 256,
                f"{prefix}.requeue_exit_code must be in 2..255 (0/1 mean success/crash), "
                f"got {self.requeue_exit_code}")
        require(self.resume in ("auto", "none") or bool(self.resume.strip()),
                f"{prefix}.resume must be 'auto', 'none' or a checkpoint directory, got {self.resume!r}")
        for name in self.preempt_signals:
            require(isinstance(name, str) and name in signal.Signals.__members__,
                    f"{prefix}.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        require(self.peak_tflops >= 0, f"{prefix}.peak_tflops must be >= 0, got {self.peak_tflops}")
        parse_device(self.device, f"{prefix}.device")
        for k in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
            require(getattr(self, k) >= 0, f"{prefix}.{k} must be >= 0 (0 = derived), got {getattr(self, k)}")
        require(self.universal_workers >= 1,
                f"{prefix}.universal_workers must be >= 1, got {self.universal_workers}")
        for k in ("val_every", "val_batch", "val_patience"):
            require(getattr(self, k) >= 0, f"{prefix}.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("val_samples", "val_knn_k"):
            require(getattr(self, k) >= 1, f"{prefix}.{k} must be >= 1, got {getattr(self, k)}")
        self._validate_stages(prefix)

    def _validate_stages(self, prefix: str) -> None:
        previous = 0
        for i, stage in enumerate(self.stages):
            key = f"{prefix}.stages[{i}]"
            stage.validate(key)
            last = i == len(self.stages) - 1
            if stage.until_step is None:
                require(last, f"{key}.until_step is required: only the last stage may run to the end (null)")
                continue
            require(stage.until_step > previous,
                    f"{key}.until_step={stage.until_step} must be greater than the previous stage's {previous}")
            require(not last or stage.until_step >= self.steps,
                    f"{key}.until_step={stage.until_step}: the last stage must reach {prefix}.steps={self.steps} "
                    f"(or be null = to the end)")
            previous = stage.until_step


def swin_grids(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Side of each Swin stage's token grid (the patch grid halved per patch merging)."""
    grid = img_size // patch_size
    return [grid // 2 ** s for s in range(num_stages)]


def validate_stages(train: TrainConfig, model, mask) -> None:
    """The checks of train.stages against the model and mask sections (Config.validate calls it
    after every section validated itself)."""
    if not train.stages:
        return
    try:
        num_stages = len(swin_layout(model)["depths"])
    except UnknownArchError as exc:
        raise ConfigError(str(exc)) from None
    sizes = {model.img_size} | {s.img_size for s in train.stages if s.img_size is not None}
    resized = len(sizes) > 1
    if resized:
        _require_whole_windows(model.img_size, "model.img_size", model, num_stages)
    for i, stage in enumerate(train.stages):
        key = f"train.stages[{i}]"
        if stage.img_size is not None:
            size = stage.img_size
            require(size % mask.mask_patch_size == 0,
                    f"{key}.img_size={size} is not divisible by mask.mask_patch_size={mask.mask_patch_size}")
            require(size % model.patch_size == 0,
                    f"{key}.img_size={size} is not divisible by model.patch_size={model.patch_size}")
            if resized:
                _require_whole_windows(size, f"{key}.img_size", model, num_stages)
        if stage.mask_ratio is not None and mask.strategy == "hpm":
            require(stage.mask_ratio > 0, f"{key}.mask_ratio must be > 0 with mask.strategy=hpm (nothing to mine)")
    last = train.stages[-1]
    # The run ends at model.img_size: export, validation and fine-tuning all read that size.
    require(last.img_size in (None, model.img_size),
            f"train.stages[{len(train.stages) - 1}].img_size={last.img_size}: the last stage must train at "
            f"model.img_size={model.img_size} (the size the export and validation use); leave it null")


def _require_whole_windows(size: int, key: str, model, num_stages: int) -> None:
    """Every stage grid at `size` is a whole number of model.window_size windows: then timm keeps
    the configured window everywhere and no parameter depends on the input size."""
    w = model.window_size
    for s, g in enumerate(swin_grids(size, model.patch_size, num_stages)):
        require(g * 2 ** s * model.patch_size == size,
                f"{key}={size}: the Swin stage-{s} grid is not whole (patch {model.patch_size}, "
                f"{num_stages} stages)")
        require(g >= w and g % w == 0,
                f"{key}={size}: the Swin stage-{s} grid {g}x{g} is not a whole number of "
                f"model.window_size={w} windows; with train.stages changing the input size every stage grid "
                f"must be (timm would otherwise resize the window's parameters mid-run, which ZeRO cannot follow)")
