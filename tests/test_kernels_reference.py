"""The PyTorch references of the fused losses (kernels/reference.py), the public API and its
dispatch. The references define what the Triton kernels must compute, so they are checked here
against independent brute-force formulas (pixel-resolution mask, dense B x C x C closure),
gradchecked in float64, and probed for the properties SPEC 3 promises."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echocare_dist.kernels import (HierarchicalMinMaxLoss, MaskedL1Loss, TableError, coherent_probs,
                                   coherent_probs_reference, hierarchical_minmax_loss,
                                   hierarchical_minmax_loss_reference, index_table, masked_l1_loss,
                                   masked_l1_loss_reference)
from echocare_dist.ontology import Ontology
from kernel_cases import masked_batch, random_labels, random_ontology, tie_heavy_logits


def tables(onto):
    return index_table(onto.ancestor_table, "cpu"), index_table(onto.descendant_table, "cpu")


# ------------------------------------------------------------------ masked L1
def pixel_mask_l1(pred, target, mask, p):
    """SimMIM's formulation: upsample the mask to pixels, mean |diff| over masked pixels."""
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).expand_as(pred).double()
    return ((pred.double() - target.double()).abs() * m).sum() / m.sum().clamp_min(1)


@pytest.mark.parametrize("B,C,H,W,p", [(1, 1, 8, 8, 2), (3, 1, 96, 96, 4), (2, 3, 12, 20, 2), (2, 2, 16, 8, 4)])
def test_masked_l1_reference_matches_pixel_mask_formula(B, C, H, W, p):
    pred, target, mask = masked_batch(B, C, H, W, p, torch.float32, seed=B * 100 + H)
    got = masked_l1_loss_reference(pred, target, mask, p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), pixel_mask_l1(pred, target, mask, p), rtol=1e-6, atol=1e-7)


def test_masked_l1_reference_reads_strided_views():
    pred, target, mask = masked_batch(2, 3, 16, 16, 4, torch.float32, seed=1)
    pred_t, target_t, mask_t = pred.transpose(2, 3), target.transpose(2, 3), mask.transpose(1, 2)
    assert not pred_t.is_contiguous()
    torch.testing.assert_close(masked_l1_loss_reference(pred_t, target_t, mask_t, 4).double(),
                               pixel_mask_l1(pred_t, target_t, mask_t, 4), rtol=1e-6, atol=1e-7)


def test_masked_l1_nothing_masked_is_zero_with_zero_grad():
    pred, target, mask = masked_batch(2, 1, 16, 16, 2, torch.float32, seed=2)
    pred.requires_grad_(True)
    loss = masked_l1_loss(pred, target, torch.zeros_like(mask), 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(pred.grad) == 0


def test_masked_l1_everything_masked_is_plain_l1():
    pred, target, mask = masked_batch(3, 2, 16, 24, 4, torch.float32, seed=3)
    got = masked_l1_loss(pred, target, torch.ones_like(mask, dtype=torch.uint8), 4)
    torch.testing.assert_close(got, F.l1_loss(pred, target), rtol=1e-6, atol=1e-7)


def test_masked_l1_reference_gradcheck_fp64():
    pred, target, mask = masked_batch(2, 2, 8, 8, 2, torch.float64, seed=4)
    pred.requires_grad_(True)
    target = target.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: masked_l1_loss_reference(a, b, mask, 2), (pred, target))


# ------------------------------------------------------------------ hierarchical min/max
def bruteforce_hierarchical(onto: Ontology, logits: torch.Tensor, labels: torch.Tensor):
    """Loss and d loss / d logits from the dense closures, one (b, v) at a time, float64."""
    z, y = logits.double().numpy(), labels.numpy()
    grad = np.zeros_like(z)
    terms = []
    for b in range(z.shape[0]):
        for v in range(z.shape[1]):
            if y[b, v] not in (0, 1):
                continue
            cand = np.flatnonzero(onto.ancestors_dense[v] if y[b, v] == 1 else onto.descendants_dense[v])
            vals = z[b, cand]
            u = cand[np.argmin(vals) if y[b, v] == 1 else np.argmax(vals)]   # first = lowest index on ties
            zh = z[b, u]
            terms.append(max(zh, 0) - zh * y[b, v] + math.log1p(math.exp(-abs(zh))))
            grad[b, u] += 1 / (1 + math.exp(-zh)) - y[b, v]
    n = max(len(terms), 1)
    return sum(terms) / n, grad / n


@pytest.mark.parametrize("onto_kind,batch", [("default", 6), ("random", 5), ("single", 3)])
def test_hierarchical_reference_matches_bruteforce(ontology, onto_kind, batch):
    onto = {"default": ontology, "random": random_ontology(23, seed=5),
            "single": Ontology.from_edges(["only"], {})}[onto_kind]
    logits = tie_heavy_logits(batch, len(onto), torch.float32, seed=6).requires_grad_(True)
    labels = random_labels(onto, batch, seed=7)
    loss = hierarchical_minmax_loss_reference(logits, labels, *tables(onto))
    loss.backward()
    want_loss, want_grad = bruteforce_hierarchical(onto, logits.detach(), labels)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(logits.grad.numpy(), want_grad, rtol=1e-5, atol=1e-8)


def test_hierarchical_ties_route_to_lowest_index():
    # chain r(0) -> m(1) -> l(2), every logit 0: each extreme is a tie.
    onto = Ontology.from_edges(["r", "m", "l"], {"m": ["r"], "l": ["m"]})
    logits = torch.zeros(1, 3, requires_grad=True)
    labels = torch.tensor([[-1, 0, 1]], dtype=torch.int8)   # m negative: max over {m, l}; l positive: min over {r, m, l}
    loss = hierarchical_minmax_loss(logits, labels, onto.ancestor_table, onto.descendant_table, impl="torch")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    # d/dz_hat = sigmoid(0) - y = +0.5 (negative) and -0.5 (positive), over n = 2 entries.
    assert logits.grad.tolist() == [[-0.25, 0.25, 0.0]]


def test_hierarchical_all_ignored_is_zero_with_zero_grad(ontology):
    logits = torch.randn(4, len(ontology), requires_grad=True)
    labels = torch.full((4, len(ontology)), -1, dtype=torch.int8)
    loss = hierarchical_minmax_loss(logits, labels, ontology.ancestor_table, ontology.descendant_table)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_hierarchical_ignored_rows_get_no_gradient(ontology):
    logits = torch.randn(3, len(ontology), requires_grad=True)
    labels = random_labels(ontology, 3, seed=8)
    labels[1] = -1
    hierarchical_minmax_loss(logits, labels, ontology.ancestor_table, ontology.descendant_table).backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0


def test_hierarchical_reference_gradcheck_fp64():
    onto = random_ontology(12, seed=9)
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)  # no ties
    labels = random_labels(onto, 3, seed=11)
    labels[0, :4] = torch.tensor([1, 0, 0, 1], dtype=torch.int8)
    anc, desc = tables(onto)
    assert torch.autograd.gradcheck(lambda z: hierarchical_minmax_loss_reference(z, labels, anc, desc), (logits,))


def dense_coherent_probs(onto, logits):
    """q_v = max over the dense D*(v) closure of sigmoid(z_u), float64 numpy (independent of the tables)."""
    p = 1.0 / (1.0 + np.exp(-logits.double().numpy()))
    return np.where(onto.descendants_dense[None], p[:, None, :], -np.inf).max(-1)


@pytest.mark.parametrize("onto_kind", ["default", "random"])
def test_coherent_probs_never_rank_a_child_above_its_parent(ontology, onto_kind):
    onto = ontology if onto_kind == "default" else random_ontology(40, seed=12)
    logits = torch.randn(16, len(onto), generator=torch.Generator().manual_seed(13)) * 4
    q = coherent_probs(logits, onto.descendant_table)
    assert q.dtype == torch.float32 and q.shape == logits.shape
    for child, parents in enumerate(onto.parents):
        for parent in parents:
            assert bool((q[:, parent] >= q[:, child]).all()), (onto.names[parent], onto.names[child])
    np.testing.assert_allclose(q.numpy(), dense_coherent_probs(onto, logits), rtol=1e-6, atol=1e-7)
    assert torch.equal(coherent_probs_reference(logits, index_table(onto.descendant_table, "cpu")), q)


# ------------------------------------------------------------------ API, dispatch, validation
def test_auto_and_torch_impl_agree_on_cpu(ontology):
    pred, target, mask = masked_batch(2, 1, 16, 16, 2, torch.bfloat16, seed=14)
    assert torch.equal(masked_l1_loss(pred, target, mask, 2), masked_l1_loss(pred, target, mask, 2, impl="torch"))
    logits, labels = torch.randn(2, len(ontology)), random_labels(ontology, 2, seed=15)
    a = hierarchical_minmax_loss(logits, labels, ontology.ancestor_table, ontology.descendant_table)
    b = hierarchical_minmax_loss(logits, labels, ontology.ancestor_table, ontology.descendant_table, impl="torch")
    assert torch.equal(a, b)


def test_impl_errors_are_clear():
    pred, target, mask = masked_batch(1, 1, 8, 8, 2, torch.float32, seed=16)
    with pytest.raises(ValueError, match="impl must be one of"):
        masked_l1_loss(pred, target, mask, 2, impl="cuda")
    from echocare_dist.kernels.functional import HAS_TRITON
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            masked_l1_loss(pred, target, mask, 2, impl="triton")


@pytest.mark.parametrize("case,match", [
    ("mask_shape", r"token_mask must be \(B, H/p, W/p\)"),
    ("patch", "not a whole number of 3x3 patches"),
    ("mask_dtype", "token_mask must be bool or uint8"),
    ("target_shape", "target shape"),
])
def test_masked_l1_rejects_bad_inputs(case, match):
    pred, target, mask = masked_batch(2, 1, 8, 8, 2, torch.float32, seed=17)
    p = 2
    if case == "mask_shape":
        mask = mask[:, :3]
    elif case == "patch":
        p = 3
    elif case == "mask_dtype":
        mask = mask.float()
    elif case == "target_shape":
        target = target[:1]
    with pytest.raises((ValueError, TypeError), match=match):
        masked_l1_loss(pred, target, mask, p)


def test_hierarchical_rejects_bad_tables_and_labels(ontology):
    logits, labels = torch.randn(2, len(ontology)), random_labels(ontology, 2, seed=18)
    small = random_ontology(5, seed=19)
    with pytest.raises(ValueError, match="different ontologies"):
        hierarchical_minmax_loss(logits, labels, small.ancestor_table, small.descendant_table)
    no_self = np.array([[1], [0]], dtype=np.int32)
    with pytest.raises(TableError, match="must include v itself"):
        index_table(no_self, "cpu", "ancestor_table")
    with pytest.raises(TableError, match="node indices in"):
        index_table(np.array([[0, 7], [1, -1]], dtype=np.int32), "cpu")
    with pytest.raises(TypeError, match="labels must be int8"):
        hierarchical_minmax_loss(logits, labels.float(), ontology.ancestor_table, ontology.descendant_table)


def test_index_table_is_cached_and_follows_in_place_edits(ontology):
    first = index_table(ontology.ancestor_table, "cpu")
    assert first.dtype == torch.int32 and first.is_contiguous()
    assert index_table(ontology.ancestor_table, "cpu") is first          # read-only numpy: cached
    t = torch.tensor([[0, -1], [1, -1]])
    assert index_table(t, "cpu").tolist() == [[0, -1], [1, -1]]
    t[1, 1] = 0                                                          # in-place edit: re-read
    assert index_table(t, "cpu").tolist() == [[0, -1], [1, 0]]


def test_modules_wrap_the_functions(ontology):
    pred, target, mask = masked_batch(2, 1, 16, 16, 4, torch.float32, seed=20)
    assert torch.equal(MaskedL1Loss(4)(pred, target, mask), masked_l1_loss(pred, target, mask, 4))
    head_loss = HierarchicalMinMaxLoss.from_ontology(ontology, impl="torch")
    assert head_loss.state_dict() == {}          # tables are derived from the ontology, not checkpointed
    logits, labels = torch.randn(3, len(ontology)), random_labels(ontology, 3, seed=21)
    assert torch.equal(head_loss(logits, labels),
                       hierarchical_minmax_loss(logits, labels, ontology.ancestor_table, ontology.descendant_table))
    assert torch.equal(head_loss.ancestor_table, index_table(ontology.ancestor_table, "cpu"))
    assert torch.equal(head_loss.descendant_table, index_table(ontology.descendant_table, "cpu"))
    with pytest.raises(ValueError, match="impl must be one of"):
        MaskedL1Loss(2, impl="fast")


def test_package_imports_and_runs_without_triton(repo_root):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, echocare_dist.kernels as k\n"
            "assert not k.HAS_TRITON\n"
            "p = torch.rand(1, 1, 4, 4); m = torch.ones(1, 2, 2, dtype=torch.bool)\n"
            "print(float(k.masked_l1_loss(p, torch.zeros_like(p), m, 2)))\n"
            "try:\n    k.masked_l1_loss(p, p, m, 2, impl='triton')\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Triton cannot be imported" in out.stdout
