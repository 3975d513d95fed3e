"""torch.compile of the model (`model.compile`): none, each Swin block (regional), or everything.

Regional compilation is the default on CUDA: Swin's roll / window partition / LayerNorm / GELU /
residual ops are memory-bound and fuse well, every block of a stage has one shape so one graph
serves the stage (compile time stays at seconds per stage, not minutes for the whole network),
and the decoders, heads and losses stay eager. On the CPU the default is none: inductor's C++
compile costs more than it saves for the tiny test models.

`nn.Module.compile()` compiles in place: no `_orig_mod.` wrapper, so state_dict keys (checkpoints,
export, fine-tuning) are those of the eager model.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("auto", "none", "blocks", "full")


def resolve_compile(mode: str, device: torch.device | str) -> str:
    """'none' | 'blocks' | 'full' for `model.compile` on `device` (auto = blocks on CUDA, none on CPU)."""
    if mode not in MODES:
        raise ValueError(f"model.compile must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "blocks" if torch.device(device).type == "cuda" else "none"
    return mode


def swin_blocks(model: nn.Module) -> list[nn.Module]:
    """Every SwinTransformerBlock of the model's encoder, in order."""
    return [block for stage in model.encoder.layers for block in stage.blocks]


def apply_compile(model: nn.Module, mode: str, device: torch.device | str) -> str:
    """Compile `model` in place as `model.compile` says; returns the resolved mode."""
    resolved = resolve_compile(mode, device)
    if resolved == "blocks":
        for block in swin_blocks(model):
            # Static shapes: each stage has one token grid; a dynamic graph would be slower.
            block.compile(dynamic=False)
    elif resolved == "full":
        model.compile(dynamic=False)
    return resolved
