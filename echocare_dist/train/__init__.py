"""Pretraining engine: DeepSpeed ZeRO, crash-safe checkpoints, preemption, MLflow (SPEC 2-4).

Entry points: `launch/pretrain.py` (any launcher), `echocare pretrain`, or `pretrain(cfg)`.
Modules: distributed, optim (AdamW, schedule, DeepSpeed config), loss, checkpoint, preemption,
tracking, metrics, images, trainer (the loop). Kept import-light: torch loads on first use.
"""


def pretrain(cfg):
    """Run (or continue) the pretraining described by `cfg` in this process; returns the exit code."""
    from .trainer import pretrain as _pretrain
    return _pretrain(cfg)


__all__ = ["pretrain"]
