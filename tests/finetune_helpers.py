"""Shared setup of the fine-tuning tests: the tiny preset's encoder exported (untrained, seed 0)
with the writer `echocare export` uses, and flat test images of a given size.

Test modules import the fixtures by name (`from finetune_helpers import exported`): pytest picks
up a fixture that a module imports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echocare_dist.config import load_config
from echocare_dist.export import write_export
from echocare_dist.models import build_model
from echocare_dist.ontology import load_ontology


def export_tiny(out: Path, with_heads: bool = False) -> Path:
    """encoder.safetensors of the tiny preset's model, initialised with seed 0."""
    cfg = load_config("tiny_cpu")
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    torch.manual_seed(0)
    write_export(build_model(cfg.model, len(onto)).state_dict(), cfg, out, with_heads=with_heads)
    return out / "encoder.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("tiny export"))


@pytest.fixture(scope="module")
def exported_with_heads(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("tiny export"), with_heads=True)


def flat_image(path: Path, w: int, h: int, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path)
    return path
