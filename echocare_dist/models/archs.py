"""Swin stage layouts of the timm names we accept.

Config validation reads this table, so it must stay importable without torch or timm
(`echocare --help` and `echocare config show` stay instant): no imports beyond the stdlib.
"""
from __future__ import annotations

SWIN_ARCHS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large_patch4_window7_224": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


class UnknownArchError(ValueError):
    """model.arch names no entry of SWIN_ARCHS."""


def swin_layout(model) -> dict:
    """embed_dim / depths / num_heads of `model.arch` after the overrides of `model` (a ModelConfig)."""
    if model.arch not in SWIN_ARCHS:
        raise UnknownArchError(f"model.arch={model.arch!r} is not one of {sorted(SWIN_ARCHS)}")
    layout = dict(SWIN_ARCHS[model.arch])
    for key in ("embed_dim", "depths", "num_heads"):
        value = getattr(model, key)
        if value is not None:
            layout[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return layout
