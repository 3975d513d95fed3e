"""Fine-tuning an exported encoder on classification, segmentation or regression data.

`echocare finetune --set finetune.task=... --set finetune.data=... --set finetune.checkpoint=...`
(or `python launch/finetune.py` with the same arguments). See data.py for the accepted layouts
and metrics.py for the metric conventions.
"""
from .metrics import (accuracy, auc_ovr, binary_auc, dice, macro_f1, mae, normalized_surface_distance)
from .runner import Finetuner, load_finetuned, run_finetune

__all__ = ["Finetuner", "accuracy", "auc_ovr", "binary_auc", "dice", "load_finetuned", "macro_f1", "mae",
           "normalized_surface_distance", "run_finetune"]
