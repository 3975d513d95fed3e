"""Triton hierarchical min/max loss and coherent probabilities (interpreter) against the reference."""
from __future__ import annotations

import math

import pytest
import torch

from echocare_dist.kernels import (coherent_probs, coherent_probs_reference, hierarchical_minmax_loss,
                                   hierarchical_minmax_loss_reference, index_table)
from echocare_dist.kernels.hierarchical import coherent_probs_triton, hierarchical_minmax_loss_triton
from echocare_dist.ontology import Ontology
from kernel_cases import LOSS_RTOL, assert_grads_close, random_labels, random_ontology, tie_heavy_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SINGLE = Ontology.from_edges(["only"], {})


def tables(onto):
    return index_table(onto.ancestor_table, "cpu"), index_table(onto.descendant_table, "cpu")


def run(impl, leaf, labels, anc, desc, view=lambda t: t, blocks=None):
    leaf = leaf.detach().clone().requires_grad_(True)
    if impl == "triton":
        loss = hierarchical_minmax_loss_triton(view(leaf), labels, anc, desc, blocks)
    else:
        loss = hierarchical_minmax_loss_reference(view(leaf), labels, anc, desc)
    loss.backward()
    return loss, leaf.grad


def check_against_reference(leaf, labels, anc, desc, view=lambda t: t, blocks=None):
    loss, grad = run("triton", leaf, labels, anc, desc, view, blocks)
    ref_loss, ref_grad = run("torch", leaf, labels, anc, desc, view)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=1e-7)
    assert grad.dtype == leaf.dtype
    # Same arg node everywhere (ties included), so zero-gradient entries must match exactly.
    assert torch.equal(grad != 0, ref_grad != 0)
    assert_grads_close(grad, ref_grad, leaf.dtype, scale=ref_grad.abs().max().item())
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("C", [1, 5, 117])
def test_matches_reference(ontology, C, B, dtype):
    onto = {1: SINGLE, 5: random_ontology(5, seed=B), 117: ontology}[C]
    logits = tie_heavy_logits(B, C, dtype, seed=C + B)
    labels = random_labels(onto, B, seed=C * B)
    check_against_reference(logits, labels, *tables(onto))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_dags_raw_labels_small_blocks(seed):
    # GPU-sized blocks: several node blocks, table chunks and row blocks per launch; labels not
    # closure-consistent, including values other than 1 / 0 / -1 (ignored).
    onto = random_ontology(70, seed=seed, max_parents=3)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 3, (5, 70), generator=g, dtype=torch.int8)
    logits = tie_heavy_logits(5, 70, torch.float32, seed=seed)
    check_against_reference(logits, labels, *tables(onto), blocks=(2, 32, 4))


def test_default_ontology_gpu_blocks(ontology):
    logits = tie_heavy_logits(5, len(ontology), torch.bfloat16, seed=2)
    check_against_reference(logits, random_labels(ontology, 5, seed=3), *tables(ontology), blocks=(2, 128, 16))


def test_strided_logits_and_labels(ontology):
    B, C = 6, len(ontology)
    wide = tie_heavy_logits(B, 2 * C, torch.float16, seed=4)
    labels = random_labels(ontology, B, seed=5).t().contiguous().t()           # column-major labels
    assert not labels.is_contiguous()
    check_against_reference(wide, labels, *tables(ontology), view=lambda t: t[:, ::2])
    tall = tie_heavy_logits(C, B, torch.float32, seed=6)                        # logits = tall.T
    check_against_reference(tall, labels, *tables(ontology), view=lambda t: t.t())


def test_ties_route_to_lowest_index():
    onto = Ontology.from_edges(["r", "m", "l"], {"m": ["r"], "l": ["m"]})
    labels = torch.tensor([[-1, 0, 1]], dtype=torch.int8)
    loss, grad = run("triton", torch.zeros(1, 3), labels, *tables(onto))
    assert loss.item() == pytest.approx(math.log(2))
    assert grad.tolist() == [[-0.25, 0.25, 0.0]]


def test_all_ignored_and_ignored_rows(ontology):
    anc, desc = tables(ontology)
    logits = tie_heavy_logits(4, len(ontology), torch.float32, seed=7)
    loss, grad = run("triton", logits, torch.full((4, len(ontology)), -1, dtype=torch.int8), anc, desc)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    labels = random_labels(ontology, 4, seed=8)
    labels[2] = -1
    _, grad = run("triton", logits, labels, anc, desc)
    assert torch.count_nonzero(grad[2]) == 0


def test_gradient_only_reaches_argmin_argmax_nodes(ontology):
    # Every non-zero gradient entry must be the chosen node of some labelled (b, v): recompute the
    # chosen nodes with the reference helper and compare the support.
    from echocare_dist.kernels.reference import table_extreme_reference
    anc, desc = tables(ontology)
    logits = tie_heavy_logits(8, len(ontology), torch.float32, seed=9)
    labels = random_labels(ontology, 8, seed=10)
    _, grad = run("triton", logits, labels, anc, desc)
    _, arg_min = table_extreme_reference(logits, anc, largest=False)
    _, arg_max = table_extreme_reference(logits, desc, largest=True)
    chosen = torch.zeros_like(grad, dtype=torch.bool)
    for b, v in zip(*torch.nonzero(labels == 1, as_tuple=True)):
        chosen[b, arg_min[b, v]] = True
    for b, v in zip(*torch.nonzero(labels == 0, as_tuple=True)):
        chosen[b, arg_max[b, v]] = True
    assert not bool(((grad != 0) & ~chosen).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coherent_probs(ontology, dtype):
    logits = (torch.randn(64, len(ontology), generator=torch.Generator().manual_seed(11)) * 4).to(dtype)
    desc = index_table(ontology.descendant_table, "cpu")
    q = coherent_probs_triton(logits, desc)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, coherent_probs_reference(logits, desc).float(), rtol=1e-6, atol=1e-6)
    for child, parents in enumerate(ontology.parents):
        for parent in parents:
            assert bool((q[:, parent] >= q[:, child]).all())
    small = coherent_probs_triton(logits[:5], desc, blocks=(2, 32, 4))
    assert torch.equal(small, q[:5])
    assert torch.equal(coherent_probs(logits, ontology.descendant_table, impl="triton"), q)


def test_public_api_dispatch_and_determinism(ontology):
    logits = tie_heavy_logits(16, len(ontology), torch.bfloat16, seed=12)
    labels = random_labels(ontology, 16, seed=13)
    anc, desc = tables(ontology)
    first, again = run("triton", logits, labels, anc, desc), run("triton", logits, labels, anc, desc)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    api = hierarchical_minmax_loss(logits, labels.to(torch.int64), ontology.ancestor_table,
                                   ontology.descendant_table, impl="triton")
    assert torch.equal(api, first[0])


def test_nan_logits_surface_in_the_loss(ontology):
    anc, desc = tables(ontology)
    logits = tie_heavy_logits(2, len(ontology), torch.float32, seed=14)
    logits[1, 0] = float("nan")      # a root: it is in A*(v) of its subtree's positives
    labels = torch.ones(2, len(ontology), dtype=torch.int8)
    assert torch.isnan(hierarchical_minmax_loss_triton(logits, labels, anc, desc))
    assert torch.isnan(hierarchical_minmax_loss_reference(logits, labels, anc, desc))
    assert torch.isnan(coherent_probs_triton(logits, desc)[1, 0])
