"""Fused masked patch L1 loss (SPEC 3.1) in Triton.

L = sum over pixels inside masked tokens |pred - target| / (masked pixels * channels).

Forward: one pass over pred and target. Each program takes a BLOCK_H x BLOCK_W tile of one
(b, c) plane, reads the token mask at patch resolution (pixel (h, w) belongs to token
(h // p, w // p)), and writes its partial sum and masked-pixel count; `finalize_mean` reduces
the partials deterministically. Pixels of unmasked tokens are never loaded (masked loads), so
with SimMIM's 32-pixel mask patches about half of the image bytes are not read at all.
Backward: one pass writing grad = sign(pred - target) * mask / count * grad_out.
Neither a pixel-resolution mask nor a |diff| tensor ever exists; inputs are read through their
strides (non-contiguous views cost no copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_common import Launch, check_triton_device, finalize_mean, is_interpreted, next_pow2

# One tile = BLOCK_H x BLOCK_W pixels of one plane. On a GPU 4096 pixels (16 per thread at 8
# warps, full 128-byte rows when W >= 256) keep enough loads in flight to saturate HBM; the
# interpreter pays ~1 ms per program, so there a tile is a whole plane.
GPU_TILE, GPU_MAX_BLOCK_W, GPU_WARPS = 4096, 256, 8
INTERPRETER_TILE, INTERPRETER_MAX_BLOCK_W = 1 << 17, 1024


@triton.jit
def _load_masked_tile(pred_ptr, target_ptr, mask_ptr, C, H, W, tiles_w, tiles_per_plane,
                      sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w,
                      PATCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's tile: pixel coordinates, the token mask at those pixels, and pred / target
    in float32 (0 wherever the token is not masked: those bytes are never read)."""
    pid = tl.program_id(0)
    plane = pid // tiles_per_plane
    tile = pid % tiles_per_plane
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    h = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = (h[:, None] < H) & (w[None, :] < W)
    token = (h // PATCH)[:, None] * sm_h + (w // PATCH)[None, :] * sm_w
    selected = tl.load(mask_ptr + b * sm_b + token, mask=inside, other=0) != 0
    x = tl.load(pred_ptr + b * sp_b + c * sp_c + h[:, None] * sp_h + w[None, :] * sp_w,
                mask=selected, other=0.0).to(tl.float32)
    y = tl.load(target_ptr + b * st_b + c * st_c + h[:, None] * st_h + w[None, :] * st_w,
                mask=selected, other=0.0).to(tl.float32)
    return pid, b, c, h, w, inside, selected, x, y


@triton.jit
def _masked_l1_fwd_kernel(pred_ptr, target_ptr, mask_ptr, partial_sum_ptr, partial_count_ptr,
                          C, H, W, tiles_w, tiles_per_plane,
                          sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w,
                          PATCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, b, c, h, w, inside, selected, x, y = _load_masked_tile(
        pred_ptr, target_ptr, mask_ptr, C, H, W, tiles_w, tiles_per_plane,
        sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w, PATCH, BLOCK_H, BLOCK_W)
    tl.store(partial_sum_ptr + pid, tl.sum(tl.sum(tl.abs(x - y), axis=1), axis=0))
    tl.store(partial_count_ptr + pid, tl.sum(tl.sum(selected.to(tl.int32), axis=1), axis=0))


@triton.jit
def _masked_l1_bwd_kernel(pred_ptr, target_ptr, mask_ptr, grad_ptr, inv_count_ptr, grad_out_ptr,
                          C, H, W, tiles_w, tiles_per_plane,
                          sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w,
                          sg_b, sg_c, sg_h, sg_w,
                          PATCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, b, c, h, w, inside, selected, x, y = _load_masked_tile(
        pred_ptr, target_ptr, mask_ptr, C, H, W, tiles_w, tiles_per_plane,
        sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w, PATCH, BLOCK_H, BLOCK_W)
    scale = tl.load(inv_count_ptr) * tl.load(grad_out_ptr)
    d = x - y   # 0 outside the mask (both loads fell back to 0), so the gradient is 0 there
    grad = tl.where(d > 0, scale, tl.where(d < 0, -scale, 0.0))
    # Every pixel is written (zeros included): the gradient buffer comes from torch.empty.
    tl.store(grad_ptr + b * sg_b + c * sg_c + h[:, None] * sg_h + w[None, :] * sg_w,
             grad.to(grad_ptr.dtype.element_ty), mask=inside)


def l1_blocks(H: int, W: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) for an H x W plane: full rows where possible, a fixed pixel budget."""
    tile, max_w = (INTERPRETER_TILE, INTERPRETER_MAX_BLOCK_W) if interpreted else (GPU_TILE, GPU_MAX_BLOCK_W)
    block_w = min(next_pow2(W), max_w)
    block_h = min(next_pow2(H), max(1, tile // block_w))
    return block_h, block_w


def token_mask_as_u8(token_mask: torch.Tensor) -> torch.Tensor:
    """A bool / uint8 / int8 mask reinterpreted as uint8 without a copy (same element size)."""
    if token_mask.dtype == torch.uint8:
        return token_mask
    if token_mask.dtype in (torch.bool, torch.int8):
        return token_mask.view(torch.uint8)
    raise TypeError(f"token_mask must be bool or uint8, got {token_mask.dtype}")


def _check_offsets_fit_int32(t: torch.Tensor, name: str) -> None:
    # Plane bases are computed in int64; offsets inside one plane stay int32 (cheaper on GPU).
    extent = sum((n - 1) * s for n, s in zip(t.shape[-2:], t.stride()[-2:]))
    if extent >= 2 ** 31:
        raise ValueError(f"{name}: one H x W plane spans {extent} elements in memory, above the "
                         "kernel's int32 in-plane offsets; pass a contiguous tensor")


@dataclass(frozen=True)
class L1Geometry:
    """How one call is tiled: shared by the forward and backward launches."""
    programs: int
    args: tuple         # C, H, W, tiles_w, tiles_per_plane, strides of pred, target, mask
    constexprs: dict


def l1_geometry(pred, target, mask, patch_size: int, block_h=None, block_w=None) -> L1Geometry:
    B, C, H, W = pred.shape
    default_h, default_w = l1_blocks(H, W, is_interpreted(_masked_l1_fwd_kernel))
    block_h, block_w = block_h or default_h, block_w or default_w
    tiles_w = triton.cdiv(W, block_w)
    tiles_per_plane = triton.cdiv(H, block_h) * tiles_w
    return L1Geometry(B * C * tiles_per_plane,
                      (C, H, W, tiles_w, tiles_per_plane, *pred.stride(), *target.stride(), *mask.stride()),
                      dict(PATCH=int(patch_size), BLOCK_H=block_h, BLOCK_W=block_w))


def l1_forward_launch(pred, target, mask, partial_sum, partial_count, geo: L1Geometry) -> Launch:
    return Launch(_masked_l1_fwd_kernel, (geo.programs,), (pred, target, mask, partial_sum, partial_count, *geo.args),
                  geo.constexprs, GPU_WARPS)


def l1_backward_launch(pred, target, mask, grad, inv_count, grad_out, geo: L1Geometry) -> Launch:
    return Launch(_masked_l1_bwd_kernel, (geo.programs,),
                  (pred, target, mask, grad, inv_count, grad_out, *geo.args, *grad.stride()), geo.constexprs, GPU_WARPS)


class MaskedL1LossFunction(torch.autograd.Function):
    """Triton masked patch L1: forward(pred, target, token_mask, patch_size) -> float32 scalar."""

    @staticmethod
    def forward(ctx, pred, target, token_mask, patch_size, block_h=None, block_w=None):
        check_triton_device(pred, target, token_mask)
        for t, name in ((pred, "pred"), (target, "target")):
            _check_offsets_fit_int32(t, name)
        mask = token_mask_as_u8(token_mask)
        geo = l1_geometry(pred, target, mask, patch_size, block_h, block_w)
        partial_sum = torch.empty(geo.programs, dtype=torch.float32, device=pred.device)
        partial_count = torch.empty(geo.programs, dtype=torch.int32, device=pred.device)
        l1_forward_launch(pred, target, mask, partial_sum, partial_count, geo)()
        loss, inv_count = finalize_mean(partial_sum, partial_count)
        ctx.save_for_backward(pred, target, mask, inv_count)
        ctx.geo = geo
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        pred, target, mask, inv_count = ctx.saved_tensors
        grad = torch.empty_like(pred)   # same layout as pred when pred is dense (e.g. channels_last)
        grad_out = grad_out.to(device=pred.device, dtype=torch.float32).contiguous()
        l1_backward_launch(pred, target, mask, grad, inv_count, grad_out, ctx.geo)()
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = (-grad).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None, None


def masked_l1_loss_triton(pred, target, token_mask, patch_size, block_h=None, block_w=None):
    return MaskedL1LossFunction.apply(pred, target, token_mask, int(patch_size), block_h, block_w)
