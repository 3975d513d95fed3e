"""Pretraining engine: DeepSpeed ZeRO, crash-safe checkpoints, preemption, MLflow (SPEC 2-4).

Entry points: `launch/pretrain.py` (any launcher), `echocare pretrain`, or `pretrain(cfg)`.
Modules: distributed, optim (AdamW, schedule, DeepSpeed config), loss, step (`build_components`
and `train_step`, which benchmarks/train_step.py runs too), nonfinite (NaN/Inf steps skipped),
checkpoint, preemption, control (the step-control vote), faults (failure reports, watchdog, fault
injection), launcher (`echocare pretrain --nproc N`), metrics, images, trainer (the loop). Tracking is `echocare_dist.tracking` (fine-tuning uses it too).
Kept import-light: torch loads on first use.
"""


def pretrain(cfg):
    """Run (or continue) the pretraining described by `cfg` in this process; returns the exit code."""
    from .trainer import pretrain as _pretrain
    return _pretrain(cfg)


__all__ = ["pretrain"]
