"""Fine-tuning an exported encoder: classification, segmentation, regression, landmarks, detection, enhancement.

`echocare finetune --set finetune.task=... --set finetune.data=... --set finetune.checkpoint=...`
(or `python launch/finetune.py` with the same arguments). See data.py for the accepted layouts
and metrics.py for the metric conventions. `echocare evaluate` (evaluate.py) compares pretrained
vs random init vs a raw-pixel baseline on one group-aware split (splits.py) or K folds.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# public name -> submodule defining it; lazy so that `echocare --help` does not import torch
_EXPORTS = {name: "metrics" for name in ("accuracy", "auc_ovr", "binary_auc", "dice", "macro_f1", "mae",
                                         "normalized_surface_distance")}
_EXPORTS.update({name: "runner" for name in ("Finetuner", "run_finetune")})
_EXPORTS["load_finetuned"] = "checkpoints"
_EXPORTS["run_evaluate"] = "evaluate"
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
