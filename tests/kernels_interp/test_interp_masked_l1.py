"""Triton masked patch L1 (interpreter) against the PyTorch reference: loss, gradient, edge cases."""
from __future__ import annotations

import pytest
import torch

from echocare_dist.kernels import masked_l1_loss, masked_l1_loss_reference
from echocare_dist.kernels.masked_l1 import masked_l1_loss_triton
from kernel_cases import LOSS_RTOL, assert_grads_close, masked_batch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(impl, leaf, target, mask, p, view=lambda t: t, **blocks):
    """Loss and gradient w.r.t. `leaf` (pred = view(leaf), so strided views reach the kernel)."""
    leaf = leaf.detach().clone().requires_grad_(True)
    if impl == "triton":
        loss = masked_l1_loss_triton(view(leaf), target, mask, p, **blocks)
    else:
        loss = masked_l1_loss_reference(view(leaf), target, mask, p)
    loss.backward()
    return loss, leaf.grad


def check_against_reference(leaf, target, mask, p, view=lambda t: t, **blocks):
    loss, grad = run("triton", leaf, target, mask, p, view, **blocks)
    ref_loss, ref_grad = run("torch", leaf, target, mask, p, view)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=1e-7)
    assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    assert_grads_close(grad, ref_grad, leaf.dtype, scale=ref_grad.abs().max().item())
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,p", [(1, 96, 2), (1, 256, 4), (3, 96, 4), (3, 256, 2)])
def test_matches_reference(B, H, p, dtype):
    pred, target, mask = masked_batch(B, 1, H, H, p, dtype, seed=B * 1000 + H + p)
    check_against_reference(pred, target, mask, p)


@pytest.mark.parametrize("p,dtype", [(2, torch.float32), (4, torch.bfloat16)])
def test_matches_reference_batch_64(p, dtype):
    pred, target, mask = masked_batch(64, 1, 256, 256, p, dtype, seed=p)
    check_against_reference(pred, target, mask, p)


def test_small_tiles_with_ragged_edges():
    # GPU-sized tiles: 90 x 70 is not a multiple of 16 x 32, several tiles per plane, C = 3.
    pred, target, mask = masked_batch(2, 3, 90, 70, 2, torch.float32, seed=3)
    check_against_reference(pred, target, mask, 2, block_h=16, block_w=32)


def test_strided_inputs():
    B, C, H, p = 3, 2, 96, 4
    pred, target, mask = masked_batch(B, C, 2 * H, H, p, torch.bfloat16, seed=4)
    mask = mask[:, ::2]                                       # (B, H/p, H/p), row stride doubled
    target = target[:1, :, ::2].expand(B, C, H, H)           # batch stride 0, row stride doubled
    loss, _ = check_against_reference(pred, target, mask, p, view=lambda t: t[:, :, ::2])
    # H <-> W transposed views of everything
    check_against_reference(pred[:, :, :H], target.transpose(2, 3), mask.transpose(1, 2), p,
                            view=lambda t: t.transpose(2, 3))


def test_channels_last_gradient_keeps_layout():
    pred, target, mask = masked_batch(2, 3, 32, 32, 2, torch.float16, seed=5)
    pred = pred.to(memory_format=torch.channels_last).requires_grad_(True)
    masked_l1_loss_triton(pred, target, mask, 2).backward()
    assert pred.grad.stride() == pred.stride()
    ref = pred.detach().clone().requires_grad_(True)
    masked_l1_loss_reference(ref, target, mask, 2).backward()
    assert_grads_close(pred.grad, ref.grad, torch.float16, scale=ref.grad.abs().max().item())


def test_nothing_masked_never_reads_pixels_and_is_zero():
    pred, target, _ = masked_batch(2, 1, 32, 32, 4, torch.float32, seed=6)
    pred = torch.full_like(pred, float("nan")).requires_grad_(True)   # unmasked pixels must not be read
    loss = masked_l1_loss_triton(pred, target, torch.zeros(2, 8, 8, dtype=torch.bool), 4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(pred.grad) == 0


def test_everything_masked_is_plain_l1_and_unmasked_nans_are_ignored():
    pred, target, mask = masked_batch(2, 1, 32, 32, 4, torch.float32, seed=7)
    full = torch.ones_like(mask)
    torch.testing.assert_close(masked_l1_loss_triton(pred, target, full, 4), (pred - target).abs().mean(),
                               rtol=LOSS_RTOL, atol=1e-7)
    poisoned = torch.where(mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None], pred, float("nan"))
    loss, grad = run("triton", poisoned, target, mask, 4)
    ref_loss, _ = run("torch", pred, target, mask, 4)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=1e-7)
    assert torch.isfinite(grad).all()


def test_mask_dtypes_and_target_gradient():
    pred, target, mask = masked_batch(2, 1, 16, 16, 2, torch.float32, seed=8)
    losses = [masked_l1_loss_triton(pred, target, m, 2) for m in (mask, mask.to(torch.uint8), mask.to(torch.int8))]
    assert losses[0] == losses[1] == losses[2]
    a, b = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
    masked_l1_loss_triton(a, b, mask, 2).backward()
    assert torch.equal(b.grad, -a.grad)


def test_public_api_dispatch_and_determinism():
    pred, target, mask = masked_batch(3, 1, 96, 96, 2, torch.bfloat16, seed=9)
    first = run("triton", pred, target, mask, 2)
    again = run("triton", pred, target, mask, 2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])      # bitwise reproducible
    assert torch.equal(masked_l1_loss(pred, target, mask, 2, impl="triton"), first[0])
    # "auto" keeps CPU tensors on the reference, even with the interpreter available.
    assert torch.equal(masked_l1_loss(pred, target, mask, 2), masked_l1_loss_reference(pred, target, mask, 2))


# Per-mask-patch sums (hard patch mining): same pass as the loss, against the reference.

def _sums_case(pred, target, mask, p, s, **blocks):
    from echocare_dist.kernels import masked_l1_patch_sums_reference
    from echocare_dist.kernels.masked_l1 import masked_l1_loss_and_patch_sums_triton
    leaf = pred.detach().clone().requires_grad_(True)
    loss, sums = masked_l1_loss_and_patch_sums_triton(leaf, target, mask, p, s, **blocks)
    ref = masked_l1_patch_sums_reference(pred, target, mask, p, s)
    B, _, H, W = pred.shape
    assert sums.shape == (B, H // s, W // s) and sums.dtype == torch.float32 and not sums.requires_grad
    # Each cell sums up to s*s*C fp32 terms in another order than the reference.
    torch.testing.assert_close(sums, ref.float(), rtol=LOSS_RTOL * 10, atol=1e-5)
    loss.backward()
    ref_loss, ref_grad = run("torch", pred, target, mask, p)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=1e-7)
    assert_grads_close(leaf.grad, ref_grad, pred.dtype, scale=ref_grad.abs().max().item())
    return loss, sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,p,s", [(2, 1, 256, 256, 2, 32), (3, 1, 96, 160, 4, 32), (2, 3, 64, 64, 4, 16),
                                         (1, 1, 64, 32, 2, 2)])
def test_patch_sums_match_reference(B, C, H, W, p, s, dtype):
    pred, target, mask = masked_batch(B, C, H, W, p, dtype, seed=B * 7 + H + s)
    loss, sums = _sums_case(pred, target, mask, p, s)
    # Unmasked patches are exactly 0 (their pixels were never loaded); the sums add up to the loss.
    k = s // p
    any_masked = mask.reshape(B, H // s, k, W // s, k).any(dim=4).any(dim=2)
    assert torch.all(sums[~any_masked] == 0)
    masked_values = mask.sum() * p * p * C
    torch.testing.assert_close(sums.double().sum() / masked_values, loss.double(), rtol=1e-4, atol=1e-7)


def test_patch_sums_with_gpu_sized_aligned_tiles_and_strided_inputs():
    # Several tiles per plane (GPU tile shapes), a strided pred view: each cell still written once.
    pred, target, mask = masked_batch(2, 1, 128, 256, 4, torch.bfloat16, seed=11)
    _sums_case(pred[:, :, :, :128], target[:, :, :, :128].contiguous(), mask[:, :, :32].contiguous(), 4, 32,
               block_h=32, block_w=64)


def test_patch_sums_are_deterministic_and_do_not_change_the_loss():
    from echocare_dist.kernels.masked_l1 import masked_l1_loss_and_patch_sums_triton
    pred, target, mask = masked_batch(2, 1, 128, 128, 2, torch.float32, seed=12)
    a = masked_l1_loss_and_patch_sums_triton(pred, target, mask, 2, 32)
    b = masked_l1_loss_and_patch_sums_triton(pred, target, mask, 2, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Whole-plane tiles here: the loss partials are the same sums as without per-patch output.
    assert torch.equal(a[0], masked_l1_loss_triton(pred, target, mask, 2))


def test_patch_sums_public_api_validates_and_dispatches():
    from echocare_dist.kernels import masked_l1_loss_and_patch_sums, masked_l1_patch_sums_reference
    pred, target, mask = masked_batch(1, 1, 64, 64, 2, torch.float32, seed=13)
    for bad, msg in ((3, "multiple of patch_size"), (24, "power of two"), (128, "whole number")):
        with pytest.raises(ValueError, match=msg):
            masked_l1_loss_and_patch_sums(pred, target, mask, 2, bad, impl="triton")
    loss, sums = masked_l1_loss_and_patch_sums(pred, target, mask, 2, 16)      # CPU auto -> reference
    assert torch.equal(sums, masked_l1_patch_sums_reference(pred, target, mask, 2, 16).float())
    assert torch.equal(loss, masked_l1_loss_reference(pred, target, mask, 2))
