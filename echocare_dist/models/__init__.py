"""EchoCare model: timm Swin + mask token, reconstruction decoders, hierarchical head, FLOPs.

Names load on first use (PEP 562) so that `echocare_dist.models.archs`, which config
validation reads, imports without torch or timm.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# public name -> submodule defining it
_EXPORTS = {
    "EchoCareMIM": "mim", "HierarchicalHead": "mim", "build_model": "mim",
    "AnatomyPrediction": "anatomy", "anatomy_from_logits": "anatomy",
    "create_encoder": "encoder", "encoder_kwargs": "encoder",
    "flops_per_image": "flops",
    "param_groups": "weight_decay",
    "SWIN_ARCHS": "archs", "swin_layout": "archs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
