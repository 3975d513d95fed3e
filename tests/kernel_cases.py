"""Inputs shared by the kernel tests (reference tests here, Triton interpreter tests in
tests/kernels_interp/): random DAG ontologies, labels, tie-heavy logits, masked-image batches."""
from __future__ import annotations

import numpy as np
import torch

from echocare_dist.ontology import Ontology

# Relative tolerance of a gradient element, per dtype: one ulp of the stored gradient (the
# interpreter truncates fp32 -> bf16 instead of rounding, so bf16 needs a full ulp).
GRAD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float64: 1e-12}
# The losses are accumulated in fp32 from identical inputs: only the summation order differs.
LOSS_RTOL = 2e-5


def random_ontology(num_nodes: int, seed: int, max_parents: int = 2) -> Ontology:
    """A random DAG: each node picks 0..max_parents parents among earlier nodes (several roots)."""
    rng = np.random.default_rng(seed)
    names = [f"n{i}" for i in range(num_nodes)]
    parents = {}
    for i in range(1, num_nodes):
        k = int(rng.integers(0, min(i, max_parents) + 1))
        parents[names[i]] = [names[j] for j in rng.choice(i, size=k, replace=False)]
    return Ontology.from_edges(names, parents, title=f"random{num_nodes}_{seed}")


def random_labels(onto: Ontology, batch: int, seed: int) -> torch.Tensor:
    """(B, C) int8 closure labels from 0-3 named nodes per image (0 names -> all ignored)."""
    rng = np.random.default_rng(seed)
    C = len(onto)
    named = [list(rng.choice(C, size=int(rng.integers(0, min(3, C) + 1)), replace=False)) for _ in range(batch)]
    return torch.from_numpy(onto.label_matrix(named))


def tie_heavy_logits(batch: int, num_nodes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits on a coarse grid (many exact ties), exactly representable in every float dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_nodes, generator=g) * 2).round().div(2).to(dtype)


def masked_batch(B: int, C: int, H: int, W: int, p: int, dtype: torch.dtype, seed: int, ratio: float = 0.5):
    """pred (dtype), target (float32 in [0, 1], the batch contract) and a bool token mask."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(B, C, H, W, generator=g).to(dtype)
    target = torch.rand(B, C, H, W, generator=g)
    mask = torch.rand(B, H // p, W // p, generator=g) < ratio
    return pred, target, mask


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float) -> None:
    """Elementwise |a - e| <= rtol(dtype) * scale + tiny, scale = the largest expected magnitude."""
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= GRAD_RTOL[dtype] * scale + 1e-12, f"max grad error {err:.3g} (scale {scale:.3g}, {dtype})"
