"""flops_per_image (analytic) against torch's FlopCounterMode, run on the meta device (free)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from echocare_dist.config import load_config
from echocare_dist.models import build_model, flops_per_image

NUM_CLASSES = 50


def counted_forward_flops(model_cfg, num_classes: int) -> int:
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
        grid = model_cfg.img_size // model_cfg.patch_size
        x = torch.empty(1, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
        mask = torch.empty(1, grid, grid, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        model(x, mask)
    return counter.get_total_flops()


CASES = [
    pytest.param("tiny_cpu", dict(), id="tiny-multiscale"),
    pytest.param("tiny_cpu", dict(decoder="linear"), id="tiny-linear"),
    pytest.param("tiny_cpu", dict(patch_size=4, hie_head=False), id="tiny-p4-nohead"),
    pytest.param("echocare_swin_l", dict(arch="swin_tiny_patch4_window7_224", patch_size=4), id="swin-t-256"),
    pytest.param("echocare_swin_l", dict(img_size=224, window_size=7, patch_size=4, in_chans=3), id="swin-l-224-rgb"),
    pytest.param("echocare_swin_l", dict(), id="swin-l-p2"),
]


@pytest.mark.parametrize("preset,changes", CASES)
def test_analytic_flops_match_flop_counter(preset, changes):
    cfg = dataclasses.replace(load_config(preset).model, **changes)
    analytic = flops_per_image(cfg, NUM_CLASSES)
    counted = counted_forward_flops(cfg, NUM_CLASSES)
    assert abs(analytic["forward"] - counted) / counted < 0.05, (analytic, counted)
    assert analytic["train"] == 3 * analytic["forward"]
    assert analytic["forward"] == analytic["encoder"] + analytic["decoder"] + analytic["head"]


@pytest.mark.parametrize("preset,spec_gflop", [("echocare_swin_l", 361), ("echocare_swin_l_p4", 90)])
def test_swin_l_encoder_flops_match_spec(preset, spec_gflop):
    """SPEC 2's independent estimates (multiply-add = 2 FLOPs): ~361 GFLOP at patch 2, ~90 at patch 4."""
    encoder = flops_per_image(load_config(preset).model, NUM_CLASSES)["encoder"]
    assert abs(encoder / 1e9 - spec_gflop) / spec_gflop < 0.05, encoder


def test_flops_scale_with_architecture():
    base = load_config("echocare_swin_l").model
    p2 = flops_per_image(base, NUM_CLASSES)["encoder"]
    p4 = flops_per_image(dataclasses.replace(base, patch_size=4), NUM_CLASSES)["encoder"]
    # 4x the tokens with fixed windows: close to 4x the work.
    assert 3.8 < p2 / p4 < 4.2
    no_head = flops_per_image(dataclasses.replace(base, hie_head=False), NUM_CLASSES)
    assert no_head["head"] == 0
