"""Public loss functions: input checks, then dispatch to Triton or to the PyTorch reference.

impl: "auto" = Triton when every tensor is on CUDA and Triton imports, the reference otherwise;
"triton" / "torch" force one (config: loss.impl). Both give a float32 scalar loss.
Triton in interpreter mode (TRITON_INTERPRET=1, read when the kernels are defined) is for CPU
tests: on CUDA tensors it is refused (~1000x slower), never a quiet slow path. `impl=auto` on
CUDA without an importable Triton warns once and uses the reference. `describe_impl` says which
implementation a run gets, for its start-up line.
"""
from __future__ import annotations

import os
import warnings

import torch

from .reference import (coherent_probs_reference, hierarchical_minmax_loss_reference, masked_l1_loss_reference,
                        masked_l1_patch_sums_reference)
from .tables import index_table

IMPLS = ("auto", "triton", "torch")

try:  # Triton is optional: without it (or without a GPU) everything runs on the reference.
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - a broken Triton install must not break CPU training
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_IMPORT_ERROR is None
# Triton reads the variable when @triton.jit decorates, i.e. when our kernel modules import below.
TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")
_warned_fallback = False
if HAS_TRITON:  # our kernel modules import plainly: a fault in them is ours and must surface
    from .hierarchical import coherent_probs_triton, hierarchical_minmax_loss_triton
    from .masked_l1 import masked_l1_loss_and_patch_sums_triton, masked_l1_loss_triton


def _refuse_interpreter_on_cuda(tensors) -> None:
    if TRITON_INTERPRETED and any(t.is_cuda for t in tensors):
        raise RuntimeError("TRITON_INTERPRET=1 is set, so the Triton kernels run in the interpreter (~1000x "
                           "slower), and these tensors are on CUDA: unset TRITON_INTERPRET (it is for CPU "
                           "tests) or use loss.impl=torch")


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"loss.impl=auto on CUDA uses the PyTorch reference losses: Triton cannot be imported "
                      f"({TRITON_IMPORT_ERROR})", RuntimeWarning, stacklevel=4)


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"impl='triton' but Triton cannot be imported ({TRITON_IMPORT_ERROR})")
        _refuse_interpreter_on_cuda(tensors)
        return True
    if impl == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        if on_cuda and not HAS_TRITON:
            _warn_fallback_once()
        if on_cuda and HAS_TRITON:
            _refuse_interpreter_on_cuda(tensors)
        return HAS_TRITON and on_cuda
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def describe_impl(impl: str, device: torch.device | str) -> str:
    """The loss implementation `impl` gets for tensors on `device`: 'triton compiled',
    'triton interpreted' or 'torch reference' (with the reason when auto falls back)."""
    on_cuda = torch.device(device).type == "cuda"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch reference"
    if not HAS_TRITON:
        if impl == "triton":
            raise RuntimeError(f"impl='triton' but Triton cannot be imported ({TRITON_IMPORT_ERROR})")
        return f"torch reference (Triton does not import: {TRITON_IMPORT_ERROR})" if on_cuda else "torch reference"
    if impl == "auto" and not on_cuda:
        return "torch reference"
    return "triton interpreted" if TRITON_INTERPRETED else "triton compiled"


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def _check_masked_l1(pred, target, token_mask, patch_size) -> int:
    if pred.dim() != 4:
        raise ValueError(f"pred must be (B, C, H, W), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    p = int(patch_size)
    if p != patch_size or p < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    B, _, H, W = pred.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a whole number of {p}x{p} patches")
    if tuple(token_mask.shape) != (B, H // p, W // p):
        raise ValueError(f"token_mask must be (B, H/p, W/p) = {(B, H // p, W // p)} for pred {tuple(pred.shape)} "
                         f"and patch_size {p}, got {tuple(token_mask.shape)}")
    if token_mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise TypeError(f"token_mask must be bool or uint8, got {token_mask.dtype}")
    _same_device(pred=pred, target=target, token_mask=token_mask)
    return p


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, patch_size: int,
                   impl: str = "auto") -> torch.Tensor:
    """Mean |pred - target| over the pixels of masked tokens and all channels (SPEC 3.1).

    pred, target: (B, C, H, W) float (any strides, dtypes may differ); token_mask: (B, H/p, W/p)
    bool/uint8, 1 = masked. Returns a float32 scalar; 0 (zero gradient) when nothing is masked."""
    p = _check_masked_l1(pred, target, token_mask, patch_size)
    if use_triton(impl, pred, target, token_mask):
        return masked_l1_loss_triton(pred, target, token_mask, p)
    return masked_l1_loss_reference(pred, target, token_mask, p)


def _check_sum_patch(pred, p: int, sum_patch) -> int:
    s = int(sum_patch)
    if s != sum_patch or s < p or s % p:
        raise ValueError(f"sum_patch must be a positive multiple of patch_size {p}, got {sum_patch!r}")
    if s & (s - 1):
        # The kernel reshapes a tile into whole mask patches; Triton shapes are powers of two.
        raise ValueError(f"sum_patch must be a power of two, got {s}")
    H, W = pred.shape[-2:]
    if H % s or W % s:
        raise ValueError(f"image {H}x{W} is not a whole number of {s}x{s} mask patches")
    return s


def masked_l1_loss_and_patch_sums(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
                                  patch_size: int, sum_patch: int, impl: str = "auto"):
    """(masked_l1_loss(...), sums) where sums (B, H/s, W/s) float32 holds sum |pred - target| over
    the masked pixels of each s x s mask patch (s = sum_patch, e.g. SimMIM's 32): the per-patch
    difficulty that hard patch mining learns to predict. Triton computes both in one pass over the
    images; the sums carry no gradient."""
    p = _check_masked_l1(pred, target, token_mask, patch_size)
    s = _check_sum_patch(pred, p, sum_patch)
    if use_triton(impl, pred, target, token_mask):
        return masked_l1_loss_and_patch_sums_triton(pred, target, token_mask, p, s)
    return (masked_l1_loss_reference(pred, target, token_mask, p),
            masked_l1_patch_sums_reference(pred.detach(), target, token_mask, p, s).float())


def _check_logits(logits, name_tables) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (B, C) tensor, got {logits.dtype} {tuple(logits.shape)}")
    for name, table in name_tables:
        if table.shape[0] != logits.shape[1]:
            raise ValueError(f"{name} has {table.shape[0]} rows but logits have C={logits.shape[1]} nodes "
                             "(table and model built from different ontologies?)")


def hierarchical_minmax_loss(logits: torch.Tensor, labels: torch.Tensor, ancestor_table, descendant_table,
                             impl: str = "auto") -> torch.Tensor:
    """Hierarchical min/max BCE (SPEC 3.2): mean over non-ignored (b, v) of BCEWithLogits(z_hat, label).

    labels: (B, C) int8, 1 / 0 / -1 (anything but 1 and 0 is ignored). Tables: the ontology's
    padded int32 ancestor / descendant tables (numpy or tensors; device copies are cached).
    Returns a float32 scalar; 0 (zero gradient) when every entry is ignored."""
    anc = index_table(ancestor_table, logits.device, "ancestor_table")
    desc = index_table(descendant_table, logits.device, "descendant_table")
    _check_logits(logits, (("ancestor_table", anc), ("descendant_table", desc)))
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be int8 in {{1, 0, -1}}, got {labels.dtype}")
    _same_device(logits=logits, labels=labels)
    if use_triton(impl, logits, labels):
        return hierarchical_minmax_loss_triton(logits, labels.to(torch.int8), anc, desc)
    return hierarchical_minmax_loss_reference(logits, labels, anc, desc)


def coherent_probs(logits: torch.Tensor, descendant_table, impl: str = "auto") -> torch.Tensor:
    """Hierarchy-coherent probabilities q_v = max over D*(v) of sigmoid(z_u), (B, C) float32:
    thresholding q at any t never keeps a child above its parent. No gradient. The product's
    predicted anatomy (`EchoCareMIM.predict_anatomy`) is this op over the head's logits."""
    desc = index_table(descendant_table, logits.device, "descendant_table")
    _check_logits(logits, (("descendant_table", desc),))
    if use_triton(impl, logits):
        return coherent_probs_triton(logits.detach(), desc)
    return coherent_probs_reference(logits.detach(), desc).float()
