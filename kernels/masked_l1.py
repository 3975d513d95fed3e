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

Per-patch sums (hard patch mining, docs/kernels.md): with SUM_PATCH = s > 0 the forward also
writes, in the same pass, sum |pred - target| over the masked pixels of every s x s mask patch
of every plane, (B, C, H/s, W/s). Tiles are then aligned to whole mask patches, so each output
cell is written by exactly one program (no atomics: as reproducible as the loss itself).
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
def _masked_l1_fwd_kernel(pred_ptr, target_ptr, mask_ptr, partial_sum_ptr, partial_count_ptr, patch_sum_ptr,
                          C, H, W, tiles_w, tiles_per_plane,
                          sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w,
                          PATCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                          SUM_PATCH: tl.constexpr):
    pid, b, c, h, w, inside, selected, x, y = _load_masked_tile(
        pred_ptr, target_ptr, mask_ptr, C, H, W, tiles_w, tiles_per_plane,
        sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sm_b, sm_h, sm_w, PATCH, BLOCK_H, BLOCK_W)
    diff = tl.abs(x - y)
    tl.store(partial_sum_ptr + pid, tl.sum(tl.sum(diff, axis=1), axis=0))
    tl.store(partial_count_ptr + pid, tl.sum(tl.sum(selected.to(tl.int32), axis=1), axis=0))
    if SUM_PATCH > 0:
        # Tiles hold whole mask patches (l1_blocks aligns them), so the patch grid of this tile
        # is a reshape of its pixels, and no other program touches these output cells.
        GH: tl.constexpr = BLOCK_H // SUM_PATCH
        GW: tl.constexpr = BLOCK_W // SUM_PATCH
        per_patch = tl.sum(tl.sum(tl.reshape(diff, (GH, SUM_PATCH, GW, SUM_PATCH)), axis=3), axis=1)
        tile = pid % tiles_per_plane
        gh = (tile // tiles_w) * GH + tl.arange(0, GH)
        gw = (tile % tiles_w) * GW + tl.arange(0, GW)
        grid_h = H // SUM_PATCH
        grid_w = W // SUM_PATCH
        plane = (pid // tiles_per_plane).to(tl.int64)
        tl.store(patch_sum_ptr + plane * grid_h * grid_w + gh[:, None] * grid_w + gw[None, :], per_patch,
                 mask=(gh[:, None] < grid_h) & (gw[None, :] < grid_w))


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


def l1_blocks(H: int, W: int, interpreted: bool, align: int = 0) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) for an H x W plane: full rows where possible, a fixed pixel budget.
    align > 0 (a power of two): both sides are multiples of it, the budget kept by narrowing rows."""
    tile, max_w = (INTERPRETER_TILE, INTERPRETER_MAX_BLOCK_W) if interpreted else (GPU_TILE, GPU_MAX_BLOCK_W)
    block_w = min(next_pow2(W), max_w)
    block_h = min(next_pow2(H), max(1, tile // block_w))
    if align:
        block_h = max(block_h, align)
        block_w = max(align, min(block_w, tile // block_h))
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


def l1_geometry(pred, target, mask, patch_size: int, block_h=None, block_w=None, sum_patch: int = 0) -> L1Geometry:
    B, C, H, W = pred.shape
    default_h, default_w = l1_blocks(H, W, is_interpreted(_masked_l1_fwd_kernel), align=sum_patch)
    block_h, block_w = block_h or default_h, block_w or default_w
    if sum_patch and (block_h % sum_patch or block_w % sum_patch):
        raise ValueError(f"tile {block_h}x{block_w} does not hold whole {sum_patch}x{sum_patch} mask patches")
    tiles_w = triton.cdiv(W, block_w)
    tiles_per_plane = triton.cdiv(H, block_h) * tiles_w
    return L1Geometry(B * C * tiles_per_plane,
                      (C, H, W, tiles_w, tiles_per_plane, *pred.stride(), *target.stride(), *mask.stride()),
                      dict(PATCH=int(patch_size), BLOCK_H=block_h, BLOCK_W=block_w))


def l1_forward_launch(pred, target, mask, partial_sum, partial_count, geo: L1Geometry,
                      patch_sum=None, sum_patch: int = 0) -> Launch:
    """patch_sum: (B, C, H/sum_patch, W/sum_patch) float32 output, or None (then never written:
    the kernel receives partial_sum in its place, SUM_PATCH=0 compiles the store away)."""
    if (patch_sum is None) != (sum_patch == 0):
        raise ValueError("patch_sum and sum_patch go together")
    return Launch(_masked_l1_fwd_kernel, (geo.programs,),
                  (pred, target, mask, partial_sum, partial_count, partial_sum if patch_sum is None else patch_sum,
                   *geo.args), dict(geo.constexprs, SUM_PATCH=int(sum_patch)), GPU_WARPS)


def l1_backward_launch(pred, target, mask, grad, inv_count, grad_out, geo: L1Geometry) -> Launch:
    return Launch(_masked_l1_bwd_kernel, (geo.programs,),
                  (pred, target, mask, grad, inv_count, grad_out, *geo.args, *grad.stride()), geo.constexprs, GPU_WARPS)


class MaskedL1LossFunction(torch.autograd.Function):
    """Triton masked patch L1: forward(pred, target, token_mask, patch_size, sum_patch) ->
    (float32 scalar loss, per-mask-patch sums (B, H/s, W/s) float32, or an empty tensor when
    sum_patch is 0). The sums carry no gradient (they are a training signal for a predictor)."""

    @staticmethod
    def forward(ctx, pred, target, token_mask, patch_size, sum_patch=0, block_h=None, block_w=None):
        check_triton_device(pred, target, token_mask)
        for t, name in ((pred, "pred"), (target, "target")):
            _check_offsets_fit_int32(t, name)
        mask = token_mask_as_u8(token_mask)
        geo = l1_geometry(pred, target, mask, patch_size, block_h, block_w, sum_patch)
        partial_sum = torch.empty(geo.programs, dtype=torch.float32, device=pred.device)
        partial_count = torch.empty(geo.programs, dtype=torch.int32, device=pred.device)
        B, C, H, W = pred.shape
        plane_sums = (torch.empty(B, C, H // sum_patch, W // sum_patch, dtype=torch.float32, device=pred.device)
                      if sum_patch else None)
        l1_forward_launch(pred, target, mask, partial_sum, partial_count, geo, plane_sums, sum_patch)()
        loss, inv_count = finalize_mean(partial_sum, partial_count)
        ctx.save_for_backward(pred, target, mask, inv_count)
        ctx.geo = geo
        # Channels are summed here, in a fixed order (C is 1 for ultrasound: a free view).
        sums = plane_sums.sum(dim=1) if sum_patch else torch.empty(0, dtype=torch.float32, device=pred.device)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        pred, target, mask, inv_count = ctx.saved_tensors
        grad = torch.empty_like(pred)   # same layout as pred when pred is dense (e.g. channels_last)
        grad_out = grad_out.to(device=pred.device, dtype=torch.float32).contiguous()
        l1_backward_launch(pred, target, mask, grad, inv_count, grad_out, ctx.geo)()
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = (-grad).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None, None, None


def masked_l1_loss_triton(pred, target, token_mask, patch_size, block_h=None, block_w=None):
    return MaskedL1LossFunction.apply(pred, target, token_mask, int(patch_size), 0, block_h, block_w)[0]


def masked_l1_loss_and_patch_sums_triton(pred, target, token_mask, patch_size, sum_patch, block_h=None, block_w=None):
    """(loss, (B, H/sum_patch, W/sum_patch) float32 sums of |pred - target| over masked pixels)."""
    return MaskedL1LossFunction.apply(pred, target, token_mask, int(patch_size), int(sum_patch), block_h, block_w)
