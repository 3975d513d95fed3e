"""Predicted anatomy: per-node probabilities of the hierarchical head that respect the ontology."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import coherent_probs
from ..ontology import Ontology


@dataclass(frozen=True)
class AnatomyPrediction:
    """probs[b, v]: how likely image b shows ontology node names[v], (B, C) float32.

    Coherent with the hierarchy: q_v = max over D*(v) of sigmoid(z_u) is never above the q of
    any parent of v, so thresholding at any t keeps every ancestor of each node it keeps.
    """
    names: tuple[str, ...]
    probs: torch.Tensor

    def present(self, threshold: float = 0.5) -> list[list[str]]:
        """Per image, the names of the nodes with probability >= threshold (ancestor-closed)."""
        keep = (self.probs >= threshold).cpu()
        return [[self.names[v] for v in row.nonzero().flatten().tolist()] for row in keep]

    def per_image(self) -> list[dict[str, float]]:
        """Per image, {node name: probability}."""
        return [dict(zip(self.names, row)) for row in self.probs.cpu().tolist()]


def anatomy_from_logits(logits: torch.Tensor, ontology: Ontology, impl: str = "auto") -> AnatomyPrediction:
    """(B, C) head logits -> AnatomyPrediction over `ontology` (the one the head was trained on)."""
    return AnatomyPrediction(tuple(ontology.names), coherent_probs(logits, ontology.descendant_table, impl))
