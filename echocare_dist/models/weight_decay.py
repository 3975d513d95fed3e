"""AdamW parameter groups: weight decay only on weight matrices and conv kernels (SPEC 4)."""
from __future__ import annotations

from torch import nn

# Parameters that must never be decayed whatever their shape: the mask token is an embedding
# that weight decay would pull toward zero (toward "no information"), and Swin's relative
# position bias tables are additive biases on the attention logits.
NO_DECAY_NAME_PARTS = ("mask_token", "relative_position_bias_table")


def _real_ndim(param: nn.Parameter) -> int:
    # Under ZeRO-3 a parameter is a flat 1-D shard; DeepSpeed keeps the true shape in ds_shape.
    return len(getattr(param, "ds_shape", param.shape))


def is_no_decay(name: str, param: nn.Parameter, norm_param_names: frozenset[str] = frozenset()) -> bool:
    return (_real_ndim(param) <= 1 or name.endswith(".bias") or name in norm_param_names
            or any(part in name for part in NO_DECAY_NAME_PARTS))


def _norm_param_names(model: nn.Module) -> frozenset[str]:
    # Norm scales are 1-D anyway; naming them by module type also covers an unusual norm shape.
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return frozenset(names)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, [decay, no_decay] (an empty group is left out); frozen parameters skipped.

    No decay for norms, biases, the mask token, relative position bias tables and anything 1-D.
    """
    norm_names = _norm_param_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param, norm_names) else decay).append(param)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return [g for g in groups if g["params"]]
