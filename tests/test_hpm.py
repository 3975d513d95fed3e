"""Hard patch mining (mask.strategy=hpm, docs/hpm.md) in one process: mask mining, the ranking
loss, the predictor head, the loss wiring, config validation and FLOPs. The runs through the
real trainer (resume bit-exact with hpm on, ZeRO-3 on 2 ranks, export) are in test_hpm_train.py."""
from __future__ import annotations

import pytest
import torch

from echocare_dist.config import ConfigError, load_config
from echocare_dist.models import build_model, flops_per_image
from echocare_dist.models.hpm import (LossPredictor, hard_share, mine_mask, mining_generator, ranking_loss,
                                      tokens_from_units, units_from_tokens)
from echocare_dist.train.loss import PretrainLoss


def _random_units(B: int, u: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(B, u * u, generator=g).argsort(dim=1)[:, :n]
    return torch.zeros(B, u * u, dtype=torch.uint8).scatter_(1, order, 1).view(B, u, u)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_mined_mask_keeps_the_ratio_takes_the_hardest_and_the_rest_from_the_random_mask(share):
    B, u, n = 3, 8, 32
    rand = _random_units(B, u, n, seed=1)
    scores = torch.randn(B, u, u, generator=torch.Generator().manual_seed(2))
    mined = mine_mask(rand, scores, share, mining_generator(0, 5, 0, 0))
    assert mined.dtype == torch.uint8 and mined.shape == rand.shape
    assert mined.flatten(1).sum(1).tolist() == [n] * B
    n_hard = int(share * n + 0.5)
    top = scores.flatten(1).topk(n_hard, dim=1).indices if n_hard else torch.zeros(B, 0, dtype=torch.long)
    flat, rflat = mined.flatten(1), rand.flatten(1)
    for b in range(B):
        assert flat[b, top[b]].all()                            # the hardest units are masked
        rest = flat[b].clone()
        rest[top[b]] = 0
        assert torch.all(rest <= rflat[b])                     # the others come from the random mask
    if share == 0.0:
        assert torch.equal(mined, rand)                        # no mining: the random mask itself


def test_mining_is_a_pure_function_of_seed_and_position():
    rand = torch.zeros(2, 16, dtype=torch.uint8)
    rand[:, 8:] = 1                    # 8 random units, none among the 4 hardest
    rand = rand.view(2, 4, 4)
    scores = torch.zeros(2, 4, 4)      # all tied: the hard part goes to the lowest indices
    a = mine_mask(rand, scores, 0.5, mining_generator(7, 10, 1, 0))
    assert torch.equal(a, mine_mask(rand, scores, 0.5, mining_generator(7, 10, 1, 0)))
    assert a.flatten(1)[:, :4].all() and a.flatten(1)[:, 4:8].sum() == 0
    # Which 4 of the 8 random units stay depends on the step / rank / micro-batch (1/70 to collide).
    others = [mine_mask(rand, scores, 0.5, mining_generator(7, step, rank, micro))
              for step, rank, micro in ((11, 1, 0), (10, 0, 0), (10, 1, 1))]
    assert sum(torch.equal(a, o) for o in others) <= 1
    with pytest.raises(ValueError, match="same number of units"):
        mine_mask(torch.stack([rand[0], torch.zeros_like(rand[0])]), scores, 0.5, mining_generator(0, 0, 0, 0))


def test_hard_share_ramps_linearly_then_holds():
    assert [hard_share(s, 0.6, 10) for s in (0, 5, 10, 20)] == [0.0, pytest.approx(0.3), pytest.approx(0.6), 0.6]
    assert hard_share(0, 0.6, 0) == 0.6


def test_ranking_loss_rewards_the_true_order_and_ignores_unmasked_units():
    true = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[[1, 1], [1, 0]]], dtype=torch.uint8)
    right, wrong = ranking_loss(true * 3, true, mask), ranking_loss(-true * 3, true, mask)
    assert right < 0.1 < 2.0 < wrong
    # The unmasked unit (loss 4) is no pair member: changing its score changes nothing.
    moved = true.clone() * 3
    moved[0, 1, 1] = -100.0
    assert torch.equal(ranking_loss(moved, true, mask), right)
    # Only the order counts: a rescaled true loss gives the same objective.
    assert torch.equal(ranking_loss(true * 3, true * 10, mask), right)
    scores = torch.zeros(1, 2, 2, requires_grad=True)
    empty = ranking_loss(scores, true, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(scores.grad) == 0


@pytest.mark.parametrize("grid,units", [(8, 8), (16, 8), (4, 8)])
def test_loss_predictor_maps_any_last_stage_grid_to_the_unit_grid(grid, units):
    head = LossPredictor(32, units)
    out = head(torch.randn(2, grid, grid, 32))
    assert out.shape == (2, units, units) and out.dtype == torch.float32


def test_units_and_tokens_round_trip():
    units = _random_units(2, 4, 6, seed=4)
    tokens = tokens_from_units(units, 4)
    assert tokens.shape == (2, 16, 16)
    assert torch.equal(units_from_tokens(tokens, 4), units)


def test_model_with_predictor_and_the_difficulty_pass(ontology):
    cfg = load_config("tiny_cpu", ["mask.strategy=hpm"])
    units = cfg.model.img_size // cfg.mask.mask_patch_size
    model = build_model(cfg.model, len(ontology), hpm_units=units).eval()
    side, grid = cfg.model.img_size, cfg.model.img_size // cfg.model.patch_size
    x = torch.randn(2, 1, side, side)
    out = model(x, torch.zeros(2, grid, grid, dtype=torch.uint8))
    assert out["difficulty"].shape == (2, units, units)
    only = model(x, None, True)
    assert set(only) == {"difficulty"}
    # An all-zero mask is the unmasked image: both passes score it the same.
    torch.testing.assert_close(only["difficulty"], out["difficulty"])
    assert not any(k.startswith("encoder.") for k, _ in model.loss_predictor.named_parameters(prefix="loss_predictor"))
    plain = build_model(cfg.model, len(ontology))
    assert plain.loss_predictor is None and plain(x, torch.zeros(2, grid, grid))["difficulty"] is None
    with pytest.raises(ValueError, match="loss predictor"):
        plain(x, None, True)


def _batch(cfg, ontology, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    side, p, mp = cfg.model.img_size, cfg.model.patch_size, cfg.mask.mask_patch_size
    u = side // mp
    target = torch.rand(B, 1, side, side, generator=g)
    units = _random_units(B, u, u * u // 2, seed)
    return dict(input=(target - 0.5) / 0.5, target=target, mask=tokens_from_units(units, mp // p),
                labels=torch.randint(-1, 2, (B, len(ontology)), generator=g).to(torch.int8))


def test_pretrain_loss_adds_the_weighted_ranking_loss(ontology):
    cfg_r = load_config("tiny_cpu")
    cfg_h = load_config("tiny_cpu", ["mask.strategy=hpm", "mask.hpm_loss_weight=0.5"])
    units = cfg_h.model.img_size // cfg_h.mask.mask_patch_size
    torch.manual_seed(0)
    model = build_model(cfg_h.model, len(ontology), hpm_units=units)
    batch = _batch(cfg_h, ontology)
    out = model(batch["input"], batch["mask"])
    total_r, mim_r, hie_r = PretrainLoss(cfg_r, ontology)(out, batch)
    hpm_loss = PretrainLoss(cfg_h, ontology)
    total_h, mim_h, hie_h = hpm_loss(out, batch)
    assert torch.equal(mim_h, mim_r) and torch.equal(hie_h, hie_r)   # the same L_MIM, from the same kernel pass
    rank = hpm_loss.last_rank
    assert rank is not None and rank > 0
    torch.testing.assert_close(total_h, total_r + 0.5 * rank)
    # The true per-unit losses average to L_MIM over the masked units.
    masked = units_from_tokens(batch["mask"], cfg_h.mask.mask_patch_size // cfg_h.model.patch_size).bool()
    torch.testing.assert_close(hpm_loss.last_unit_loss[masked].mean(), mim_h)
    total_h.backward()
    assert model.loss_predictor.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sets,key", [
    (["mask.strategy=hard"], "mask.strategy"),
    (["mask.strategy=hpm", "mask.hpm_ratio=1.5"], "mask.hpm_ratio"),
    (["mask.strategy=hpm", "mask.hpm_warmup_steps=-1"], "mask.hpm_warmup_steps"),
    (["mask.strategy=hpm", "mask.hpm_loss_weight=-1"], "mask.hpm_loss_weight"),
    (["mask.strategy=hpm", "mask.mask_patch_size=24", "model.img_size=48"], "mask.mask_patch_size"),
    (["mask.strategy=hpm", "mask.mask_ratio=0"], "mask.mask_ratio"),
])
def test_config_rejects_bad_hpm_values_naming_the_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", sets)


def test_hpm_flops_add_one_encoder_forward():
    cfg = load_config("echocare_swin_l")
    plain, hpm = flops_per_image(cfg.model, 40), flops_per_image(cfg.model, 40, hpm=True)
    assert hpm["train"] == plain["train"] + plain["encoder"] and hpm["forward"] == plain["forward"]
    assert hpm["mining"] == plain["encoder"] and plain["mining"] == 0
