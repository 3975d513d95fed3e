"""finetune.task=enhancement: paired / unpaired folder discovery, the synthetic degradation, PSNR /
SSIM, the pretraining decoder as the head's start, and a training run that opens no network
connection (no metric may download weights at run time)."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_helpers import exported_with_heads  # noqa: F401 - fixtures are found by name

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError
from echocare_dist.finetune.tasks import enhancement as E
from echocare_dist.synth.tasks import generate_task_sets


def _images(folder: Path, names: list[str], rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / n)


def _discover(root: Path, *overrides: str):
    ft = load_config("tiny_cpu", [f"finetune.data={root}", "finetune.task=enhancement", *overrides]).finetune
    return E.EnhancementTask().discover(ft, root, None)


def test_pairs_by_name_without_extension_and_counts_the_lonely(tmp_path):
    rng = np.random.default_rng(0)
    _images(tmp_path / "low", ["a.png", "b.png", "extra.png"], rng)
    _images(tmp_path / "high", ["a.jpg", "b.png"], rng)
    task = _discover(tmp_path)
    assert [(s.image.name, s.target.high.name, s.target.synthetic) for s in task.samples] == \
        [("a.png", "a.jpg", False), ("b.png", "b.png", False)]
    assert task.skipped["no_partner"] == ["extra"]


def test_unpaired_or_high_only_degrades_the_references(tmp_path):
    rng = np.random.default_rng(1)
    _images(tmp_path / "u" / "low", ["x.png", "y.png"], rng)
    _images(tmp_path / "u" / "high", ["a.png", "b.png", "c.png"], rng)
    task = _discover(tmp_path / "u")
    assert all(s.target.synthetic and s.image == s.target.high for s in task.samples) and len(task.samples) == 3
    assert task.skipped[E.UNPAIRED_KEPT] == ["low/x.png", "low/y.png"]
    _images(tmp_path / "h" / "high", ["a.png"], rng)
    assert len(_discover(tmp_path / "h").samples) == 1
    with pytest.raises(DataError, match="needs a high/ folder"):
        _discover(tmp_path / "u" / "low")


def test_degradation_is_seeded_and_lowers_the_scores():
    rng = np.random.default_rng(2)
    clean = np.clip(0.5 + 0.3 * np.sin(np.linspace(0, 12, 64))[None, :] * np.ones((64, 1)) +
                    0.05 * rng.standard_normal((64, 64)), 0, 1).astype(np.float32)
    a, b = E.degrade(clean, 7), E.degrade(clean, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, E.degrade(clean, 8))
    psnr_same, ssim_same = E.image_scores(clean, clean)
    psnr, ssim = E.image_scores(a, clean)
    assert (psnr_same, ssim_same) == (100.0, pytest.approx(1.0))
    assert psnr < 30 and ssim < 0.9


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: network access to {address} is not allowed")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.mark.slow
def test_enhancement_starts_from_the_pretraining_decoder_and_never_downloads(tmp_path, exported_with_heads,
                                                                             no_network):
    from safetensors.torch import load_file

    from echocare_dist.finetune.runner import Finetuner

    generate_task_sets(tmp_path / "data", 10)
    cfg = load_config("tiny_cpu", [f"finetune.checkpoint={exported_with_heads}", f"finetune.run_dir={tmp_path / 'run'}",
                                   "finetune.task=enhancement", f"finetune.data={tmp_path / 'data/enhancement'}",
                                   "finetune.epochs=2", "finetune.warmup_epochs=0", "finetune.bootstrap=50",
                                   "finetune.lr=1e-3", "tracking.enabled=false"])
    runner = Finetuner(cfg)
    heads = load_file(str(exported_with_heads.parent / "heads.safetensors"))
    start = runner.model.decoder.state_dict()
    assert all(torch.equal(start[k[len("decoder."):]], v) for k, v in heads.items() if k.startswith("decoder."))
    summary = runner.run()
    final = summary["final"]
    assert 0 < final["ssim"] <= 1 and 0 < final["psnr"] < 100
    assert final["psnr_ci"][0] <= final["psnr"] <= final["psnr_ci"][1]
    assert (tmp_path / "run" / "before_after.png").stat().st_size > 0
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert no_network == []  # PSNR / SSIM are computed locally; nothing is fetched
