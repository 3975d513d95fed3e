"""The loaders on the shard builder's real output, and their batches through a training step."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import loader_config, take
from echocare_dist.data import build_loader
from echocare_dist.models import build_model
from echocare_dist.train.loss import PretrainLoss

LOADERS = ["dali", "pil"]


def _provenance(shard_dir: Path) -> dict:
    out = {}
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out[m.name.split(".", 1)[0]] = json.load(io.BytesIO(tf.extractfile(m).read()))
    return out


@pytest.mark.parametrize("kind", LOADERS)
def test_builder_shards_two_ranks(tiny_shards, ontology, kind):
    """Labels match the provenance names through the ontology's closure; ranks are disjoint."""
    provenance = _provenance(Path(tiny_shards))
    keys_per_rank = []
    for rank in range(2):
        cfg = loader_config(tiny_shards, kind, micro_batch=8)
        loader = build_loader(cfg, ontology, rank=rank, world_size=2, device="cpu", run_dir=None)
        assert loader.steps_per_epoch == (len(provenance) // 2) // 8
        batches = take(loader, loader.steps_per_epoch)
        loader.close()
        keys = [k for b in batches for k in b["keys"]]
        keys_per_rank.append(set(keys))
        for b in batches:
            for key, row in zip(b["keys"], b["labels"]):
                assert np.array_equal(row, ontology.label_vector(provenance[key]["labels"])), key
    assert not keys_per_rank[0] & keys_per_rank[1]


def test_batches_feed_a_training_step(tiny_shards, ontology):
    """Both loaders, 2 simulated ranks: a forward/backward on each batch; finite losses, gradients
    reach the mask token (so the masks reached the model)."""
    torch.manual_seed(0)
    model = criterion = None
    for kind in LOADERS:
        cfg = loader_config(tiny_shards, kind, micro_batch=4)
        if model is None:
            model = build_model(cfg.model, len(ontology))
            criterion = PretrainLoss(cfg, ontology)
        for rank in range(2):
            loader = build_loader(cfg, ontology, rank=rank, world_size=2, device="cpu", run_dir=None)
            batch = next(loader)
            loader.close()
            model.zero_grad()
            total, mim, hie = criterion(model(batch["input"], batch["mask"]), batch)
            total.backward()
            assert torch.isfinite(total) and mim > 0 and hie > 0, (kind, rank)
            assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0, (kind, rank)
