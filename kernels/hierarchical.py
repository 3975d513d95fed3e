"""Fused hierarchical min/max BCE (SPEC 3.2) and coherent probabilities in Triton.

Per (image b, node v): label 1 -> z_hat = min of z[b, u] over u in A*(v); label 0 -> z_hat = max
over D*(v); loss = mean over non-ignored (b, v) of BCEWithLogits(z_hat, label).

Forward: each program takes BLOCK_B rows x BLOCK_C nodes and walks the padded ancestor and
descendant tables in BLOCK_K-wide chunks, gathering z[b, u] straight from the logits (a B x C x C
tensor never exists; the live tile is BLOCK_B x BLOCK_C x BLOCK_K). It keeps, per (b, v), the
extreme logit and the node attaining it (lowest node index on ties), writes that arg node and
d loss / d z_hat = sigmoid(z_hat) - label (float32, B x C), plus a partial loss sum and count.

Backward, deterministic and atomic-free: the gradient of logit u collects the (b, v) entries
whose arg node is u. A positive v can pick u only if u is in A*(v), i.e. v in D*(u); a negative v
only if u is in D*(v), i.e. v in A*(u). So program (rows, u) gathers over u's own descendant
table (positives) and ancestor table (negatives), in table order: the same sums every run,
with no scatter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_common import Launch, check_triton_device, finalize_mean, is_interpreted, next_pow2

# GPU: 2 rows x 128 nodes x 16 table entries per program = 4096 live gathers. Interpreter: big
# tiles, since every program costs ~1 ms whatever its size.
GPU_BLOCK_B, GPU_MAX_BLOCK_C, GPU_MAX_BLOCK_K, GPU_WARPS = 2, 128, 16, 4
# The forward walks both tables (min over A*, max over D*) and keeps value, node and NaN node
# of each live: with 4 warps (32 tile elements per thread) it needs 255 registers and spills
# 120 B (fp32) / 236 B (bf16) per thread on sm_90. 8 warps halve the elements per thread with the
# same tile (no spill on sm_80 / sm_90, the AOT gate checks it) and keep the tiny grid (B/2
# programs at C <= 128) as parallel as before; BLOCK_K=8 would instead double the table passes.
GPU_FWD_WARPS = 8
INTERPRETER_BLOCK_B, INTERPRETER_MAX_BLOCK_C, INTERPRETER_MAX_BLOCK_K = 64, 128, 64
NO_NODE = tl.constexpr(2 ** 31 - 1)   # "no node yet": above every node index


@triton.jit
def _table_extreme(z_ptr, s_zb, s_zc, table_ptr, s_t, K, rows, nodes, active,
                   IS_MAX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (row, node) where `active`: extreme of z[row, u] over u in table[node] and its lowest
    attaining u (NO_NODE where nothing is active). A NaN among the z makes the extreme NaN and
    its node the lowest NaN one, as in the reference: a diverged head shows up in the loss."""
    if IS_MAX:
        best = tl.full([BLOCK_B, BLOCK_C], float("-inf"), tl.float32)
    else:
        best = tl.full([BLOCK_B, BLOCK_C], float("inf"), tl.float32)
    best_node = tl.full([BLOCK_B, BLOCK_C], NO_NODE, tl.int32)
    nan_node = tl.full([BLOCK_B, BLOCK_C], NO_NODE, tl.int32)
    row_base = rows.to(tl.int64)[:, None, None] * s_zb
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_table = (nodes[:, None] >= 0) & (ks[None, :] < K)
        u = tl.load(table_ptr + nodes[:, None] * s_t + ks[None, :], mask=in_table, other=-1)  # (C, K)
        use = active[:, :, None] & (u >= 0)[None, :, :]
        z = tl.load(z_ptr + row_base + u[None, :, :] * s_zc, mask=use, other=0.0).to(tl.float32)
        nan_node = tl.minimum(nan_node, tl.min(tl.where(z != z, u[None, :, :], NO_NODE), axis=2))
        if IS_MAX:
            z = tl.where(use, z, float("-inf"))
            chunk_best = tl.max(z, axis=2)
        else:
            z = tl.where(use, z, float("inf"))
            chunk_best = tl.min(z, axis=2)
        hit = use & (z == chunk_best[:, :, None])
        chunk_node = tl.min(tl.where(hit, u[None, :, :], NO_NODE), axis=2)
        if IS_MAX:
            better = chunk_best > best
        else:
            better = chunk_best < best
        tie = chunk_best == best
        best_node = tl.where(better, chunk_node, tl.where(tie, tl.minimum(best_node, chunk_node), best_node))
        best = tl.where(better, chunk_best, best)
    has_nan = nan_node < NO_NODE
    best = tl.where(has_nan, float("nan"), best)
    best_node = tl.where(has_nan, nan_node, best_node)
    return best, best_node


@triton.jit
def _block_rows_nodes(B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    nodes = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # Out-of-range nodes become -1 so table loads skip them; out-of-range rows are never active.
    nodes = tl.where(nodes < C, nodes, -1)
    ok = (rows < B)[:, None] & (nodes >= 0)[None, :]
    return rows, nodes, ok


@triton.jit(do_not_specialize=["B"])  # one binary for every batch size
def _hier_fwd_kernel(z_ptr, y_ptr, anc_ptr, desc_ptr, coef_ptr, arg_ptr, partial_sum_ptr, partial_count_ptr,
                     B, C, KA, KD, s_zb, s_zc, s_yb, s_yc, s_a, s_d,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, nodes, ok = _block_rows_nodes(B, C, BLOCK_B, BLOCK_C)
    y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * s_yb + nodes[None, :] * s_yc, mask=ok, other=-1)
    positive = ok & (y == 1)
    negative = ok & (y == 0)
    lo, lo_node = _table_extreme(z_ptr, s_zb, s_zc, anc_ptr, s_a, KA, rows, nodes, positive,
                                 False, BLOCK_B, BLOCK_C, BLOCK_K)
    hi, hi_node = _table_extreme(z_ptr, s_zb, s_zc, desc_ptr, s_d, KD, rows, nodes, negative,
                                 True, BLOCK_B, BLOCK_C, BLOCK_K)
    valid = positive | negative
    z_hat = tl.where(positive, lo, tl.where(negative, hi, 0.0))
    label = positive.to(tl.float32)
    # BCEWithLogits(z, y) = max(z, 0) - z*y + log(1 + exp(-|z|)), stable for any z.
    loss = tl.maximum(z_hat, 0.0) - z_hat * label + tl.log(1.0 + tl.exp(-tl.abs(z_hat)))
    coef = tl.where(valid, tl.sigmoid(z_hat) - label, 0.0)
    arg = tl.where(positive, lo_node, tl.where(negative, hi_node, -1))
    out = rows.to(tl.int64)[:, None] * C + nodes[None, :]
    tl.store(coef_ptr + out, coef, mask=ok)
    tl.store(arg_ptr + out, arg, mask=ok)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_sum_ptr + pid, tl.sum(tl.sum(tl.where(valid, loss, 0.0), axis=1), axis=0))
    tl.store(partial_count_ptr + pid, tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0))


@triton.jit
def _collect_routed(coef_ptr, arg_ptr, y_ptr, s_yb, s_yc, table_ptr, s_t, K, rows, nodes, ok, C,
                    WANT_LABEL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (row, u): sum of coef[row, v] over v in table[u] with label WANT_LABEL and arg[row, v] == u."""
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    rows64 = rows.to(tl.int64)[:, None, None]
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(table_ptr + nodes[:, None] * s_t + ks[None, :], mask=(nodes[:, None] >= 0) & (ks[None, :] < K),
                    other=-1)
        use = ok[:, :, None] & (v >= 0)[None, :, :]
        routed = tl.load(arg_ptr + rows64 * C + v[None, :, :], mask=use, other=-1) == nodes[None, :, None]
        label = tl.load(y_ptr + rows64 * s_yb + v[None, :, :] * s_yc, mask=use & routed, other=-1)
        take = use & routed & (label == WANT_LABEL)
        acc += tl.sum(tl.load(coef_ptr + rows64 * C + v[None, :, :], mask=take, other=0.0), axis=2)
    return acc


@triton.jit(do_not_specialize=["B"])  # one binary for every batch size
def _hier_bwd_kernel(coef_ptr, arg_ptr, y_ptr, anc_ptr, desc_ptr, inv_count_ptr, grad_out_ptr, grad_ptr,
                     B, C, KA, KD, s_yb, s_yc, s_a, s_d, s_gb, s_gc,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, nodes, ok = _block_rows_nodes(B, C, BLOCK_B, BLOCK_C)
    acc = _collect_routed(coef_ptr, arg_ptr, y_ptr, s_yb, s_yc, desc_ptr, s_d, KD, rows, nodes, ok, C,
                          1, BLOCK_B, BLOCK_C, BLOCK_K)
    acc += _collect_routed(coef_ptr, arg_ptr, y_ptr, s_yb, s_yc, anc_ptr, s_a, KA, rows, nodes, ok, C,
                           0, BLOCK_B, BLOCK_C, BLOCK_K)
    grad = acc * (tl.load(inv_count_ptr) * tl.load(grad_out_ptr))
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * s_gb + nodes[None, :] * s_gc,
             grad.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["B"])  # one binary for every batch size
def _coherent_probs_kernel(z_ptr, desc_ptr, q_ptr, B, C, KD, s_zb, s_zc, s_d,
                           BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, nodes, ok = _block_rows_nodes(B, C, BLOCK_B, BLOCK_C)
    hi, _ = _table_extreme(z_ptr, s_zb, s_zc, desc_ptr, s_d, KD, rows, nodes, ok,
                           True, BLOCK_B, BLOCK_C, BLOCK_K)
    # sigmoid is monotone: max of sigmoids = sigmoid of the max, one exp per entry.
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * C + nodes[None, :], tl.sigmoid(hi), mask=ok)


def hier_blocks(B: int, C: int, K: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_K) for B rows, C nodes and a table K wide."""
    if interpreted:
        return (min(next_pow2(B), INTERPRETER_BLOCK_B), min(next_pow2(C), INTERPRETER_MAX_BLOCK_C),
                min(next_pow2(K), INTERPRETER_MAX_BLOCK_K))
    return GPU_BLOCK_B, min(next_pow2(C), GPU_MAX_BLOCK_C), min(next_pow2(K), GPU_MAX_BLOCK_K)


@dataclass(frozen=True)
class HierGeometry:
    grid: tuple
    shape_args: tuple   # B, C, KA, KD
    constexprs: dict


def hier_geometry(logits, ancestor_table, descendant_table, blocks=None) -> HierGeometry:
    B, C = logits.shape
    KA, KD = ancestor_table.shape[1], descendant_table.shape[1]
    block_b, block_c, block_k = blocks or hier_blocks(B, C, max(KA, KD), is_interpreted(_hier_fwd_kernel))
    return HierGeometry((triton.cdiv(B, block_b), triton.cdiv(C, block_c)), (B, C, KA, KD),
                        dict(BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k))


def hier_forward_launch(logits, labels, anc, desc, coef, arg, partial_sum, partial_count, geo: HierGeometry) -> Launch:
    return Launch(_hier_fwd_kernel, geo.grid,
                  (logits, labels, anc, desc, coef, arg, partial_sum, partial_count, *geo.shape_args,
                   *logits.stride(), *labels.stride(), anc.stride(0), desc.stride(0)), geo.constexprs,
                  GPU_FWD_WARPS)


def hier_backward_launch(coef, arg, labels, anc, desc, inv_count, grad_out, grad, geo: HierGeometry) -> Launch:
    return Launch(_hier_bwd_kernel, geo.grid,
                  (coef, arg, labels, anc, desc, inv_count, grad_out, grad, *geo.shape_args, *labels.stride(),
                   anc.stride(0), desc.stride(0), *grad.stride()), geo.constexprs, GPU_WARPS)


def coherent_probs_launch(logits, desc, q, blocks=None) -> Launch:
    B, C = logits.shape
    block_b, block_c, block_k = blocks or hier_blocks(B, C, desc.shape[1], is_interpreted(_coherent_probs_kernel))
    return Launch(_coherent_probs_kernel, (triton.cdiv(B, block_b), triton.cdiv(C, block_c)),
                  (logits, desc, q, B, C, desc.shape[1], *logits.stride(), desc.stride(0)),
                  dict(BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k), GPU_WARPS)


class HierarchicalMinMaxLossFunction(torch.autograd.Function):
    """Triton hierarchical min/max BCE: forward(logits, labels, ancestor_table, descendant_table)."""

    @staticmethod
    def forward(ctx, logits, labels, ancestor_table, descendant_table, blocks=None):
        check_triton_device(logits, labels, ancestor_table, descendant_table)
        geo = hier_geometry(logits, ancestor_table, descendant_table, blocks)
        dev, programs = logits.device, geo.grid[0] * geo.grid[1]
        coef = torch.empty(logits.shape, dtype=torch.float32, device=dev)
        arg = torch.empty(logits.shape, dtype=torch.int32, device=dev)
        partial_sum = torch.empty(programs, dtype=torch.float32, device=dev)
        partial_count = torch.empty(programs, dtype=torch.int32, device=dev)
        hier_forward_launch(logits, labels, ancestor_table, descendant_table, coef, arg, partial_sum, partial_count,
                            geo)()
        loss, inv_count = finalize_mean(partial_sum, partial_count)
        ctx.save_for_backward(coef, arg, labels, ancestor_table, descendant_table, inv_count)
        ctx.geo = geo
        ctx.logits_meta = (logits.shape, logits.dtype, logits.device)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        coef, arg, labels, anc, desc, inv_count = ctx.saved_tensors
        shape, dtype, device = ctx.logits_meta
        grad = torch.empty(shape, dtype=dtype, device=device)
        grad_out = grad_out.to(device=device, dtype=torch.float32).contiguous()
        hier_backward_launch(coef, arg, labels, anc, desc, inv_count, grad_out, grad, ctx.geo)()
        return grad, None, None, None, None


def hierarchical_minmax_loss_triton(logits, labels, ancestor_table, descendant_table, blocks=None):
    return HierarchicalMinMaxLossFunction.apply(logits, labels, ancestor_table, descendant_table, blocks)


@torch.no_grad()
def coherent_probs_triton(logits, descendant_table, blocks=None):
    """q (B, C) float32, q_v = max over D*(v) of sigmoid(z_u)."""
    check_triton_device(logits, descendant_table)
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    coherent_probs_launch(logits, descendant_table, q, blocks)()
    return q
