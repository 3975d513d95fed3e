"""The progressive schedule (train.stages): config, stage lookup, the model's input-size switch.
The switch through the real trainer (loader, resume) is tests/test_stages_train.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from echocare_dist import config_base, config_sections, config_train
from echocare_dist.config import ConfigError, config_from_dict, load_config
from echocare_dist.models import build_model, flops_per_image
from echocare_dist.train.distributed import DistEnv
from echocare_dist.train.loss import PretrainLoss
from echocare_dist.train import stages as stages_module
from echocare_dist.train.sample_log import ENV_VAR
from echocare_dist.train.stages import StageSchedule, resolve_stages, stage_at, stage_config

TINY = ["model.window_size=2"]  # tiny preset: every stage grid whole windows at 32 and 64 px


def tiny(*sets):
    return load_config("tiny_cpu", TINY + list(sets))


# ------------------------------------------------------------------ config
def test_the_moved_sections_are_the_same_objects_under_their_old_names():
    assert config_sections.TrainConfig is config_train.TrainConfig
    assert config_sections.StageConfig is config_train.StageConfig
    assert config_sections.ConfigError is config_base.ConfigError
    assert config_sections.parse_device is config_base.parse_device


def test_stages_from_yaml_and_from_set_agree_and_survive_the_checkpoint_round_trip():
    text = "[{until_step: 10, img_size: 32, mask_ratio: 0.25}, {until_step: null, hie_weight: 0.5}]"
    by_set = tiny(f"train.stages={text}")
    data = tiny().to_dict()
    data["train"]["stages"] = [{"until_step": 10, "img_size": 32, "mask_ratio": 0.25}, {"hie_weight": 0.5}]
    by_yaml = config_from_dict(data)
    assert by_set.train.stages == by_yaml.train.stages
    first, last = by_set.train.stages
    assert (first.until_step, first.img_size, first.mask_ratio, first.hie_weight) == (10, 32, 0.25, None)
    assert (last.until_step, last.img_size, last.hie_weight) == (None, None, 0.5)
    assert config_from_dict(by_set.to_dict()).train.stages == by_set.train.stages


@pytest.mark.parametrize("sets, message", [
    (["train.stages=[{until_step: 5}, {until_step: 5}]"], "train.stages[1].until_step=5 must be greater"),
    (["train.stages=[{until_step: 5}, {until_step: 20}]"], "train.stages[1].until_step=20: the last stage must reach"),
    (["train.stages=[{until_step: null}, {until_step: 50}]"], "train.stages[0].until_step is required"),
    (["train.stages=[{until_step: 5, mask_ratio: 1.5}, {}]"], "train.stages[0].mask_ratio must be in [0, 1]"),
    (["train.stages=[{until_step: 5, hie_weight: -1}, {}]"], "train.stages[0].hie_weight must be >= 0"),
    (["train.stages=[{until_step: 5, img_size: 40}, {}]"], "train.stages[0].img_size=40 is not divisible by mask.mask_patch_size=16"),
    (["train.stages=[{until_step: 5, img_size: 0}, {}]"], "train.stages[0].img_size must be positive"),
    (["train.stages=[{until_step: 5, img_sz: 32}, {}]"], "'train.stages[0].img_sz'"),
    (["train.stages=[{until_step: five}]"], "train.stages[0].until_step: expected an integer"),
    (["train.stages=[3, 4]"], "train.stages: expected a list of mappings"),
    (["train.stages=[{until_step: 5}, {img_size: 32}]"], "train.stages[1].img_size=32: the last stage must train at"),
    # hpm mines the masked units: a stage masking nothing is refused like mask.mask_ratio=0.
    (["mask.strategy=hpm", "train.stages=[{until_step: 5, mask_ratio: 0}, {}]"], "train.stages[0].mask_ratio must be > 0"),
])
def test_bad_stages_are_refused_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as err:
        tiny(*sets)
    assert message in str(err.value)


def test_a_stage_whose_last_swin_grid_is_smaller_than_the_window_is_refused():
    # The case: 128 px at patch 4 leaves a 4x4 last grid under the paper's window 8.
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.img_size=128: the Swin stage-3 grid 4x4"):
        load_config(None, ["mask.mask_patch_size=32", "train.steps=100",
                           "train.stages=[{until_step: 10, img_size: 128}, {}]"])
    # The same at the tiny preset's window 4: 32 px at patch 2 gives a 2x2 last grid.
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.img_size=32: the Swin stage-3 grid 2x2"):
        load_config("tiny_cpu", ["train.stages=[{until_step: 10, img_size: 32}, {}]"])
    # Bigger is fine, and a schedule that keeps the size never resizes anything.
    load_config(None, ["mask.mask_patch_size=32", "train.steps=100",
                       "train.stages=[{until_step: 10, img_size: 512}, {}]"])
    load_config("tiny_cpu", ["model.img_size=32", "train.stages=[{until_step: 10, mask_ratio: 0.3}, {}]"])


# ------------------------------------------------------------------ stage lookup
def test_stage_lookup_fills_the_base_values_and_is_a_function_of_the_step():
    cfg = tiny("train.steps=10", "loss.hie_weight=0.7",
               "train.stages=[{until_step: 3, img_size: 32, mask_ratio: 0.25}, {until_step: 6, hie_weight: 0.1}, {}]")
    stages = resolve_stages(cfg)
    assert [(s.first_step, s.last_step, s.settings) for s in stages] == [
        (1, 3, (32, 0.25, 0.7)), (4, 6, (64, 0.5, 0.1)), (7, None, (64, 0.5, 0.7))]
    assert [stage_at(stages, step).index for step in range(1, 12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    one = resolve_stages(tiny())
    assert len(one) == 1 and one[0].settings == (64, 0.5, 1.0) and stage_at(one, 10 ** 9) is one[0]
    staged = stage_config(cfg, stages[0])
    assert (staged.model.img_size, staged.mask.mask_ratio) == (32, 0.25) and cfg.model.img_size == 64
    schedule = StageSchedule(cfg, cpu_env())
    assert [s for s in range(1, 11) if schedule.is_last_step(s)] == [3, 6]   # not the run's end


def test_flops_follow_the_stage_size():
    cfg = tiny("train.stages=[{until_step: 3, img_size: 32}, {}]")
    small, large = (flops_per_image(stage_config(cfg, s).model, 10)["train"] for s in resolve_stages(cfg))
    # Swin is linear in the token count at a fixed window: a quarter of the pixels, a quarter the FLOPs.
    assert small == pytest.approx(large / 4, rel=0.02)


def test_entering_a_stage_sets_the_loss_weight_and_flops_without_touching_an_unchanged_loader(ontology):
    cfg = tiny("train.steps=10", "train.stages=[{until_step: 2, hie_weight: 0}, {}]")
    loader = object()  # rebuilt only when the size or the mask ratio changes: not here
    c = SimpleNamespace(engine=None, loader=loader, loss_fn=PretrainLoss(cfg, ontology), flops=None,
                        ontology=ontology)
    schedule = StageSchedule(cfg, cpu_env())
    first = schedule.enter(c, 1)
    assert first.index == 0 and c.loss_fn.hie_weight == 0 and not c.loss_fn.use_hie and c.loader is loader
    assert c.flops == flops_per_image(cfg.model, len(ontology))
    assert schedule.enter(c, 2) is first
    assert schedule.enter(c, 3).index == 1 and c.loss_fn.hie_weight == 1.0 and c.loss_fn.use_hie


class RecordingLoader:
    """Stands in for a PretrainLoader: what the switch asked of it (state, close, resume)."""

    def __init__(self, cfg=None, position=0):
        self.cfg, self.position, self.closed, self.resumed = cfg, position, False, None

    def state_dict(self) -> dict:
        return {"epoch": 0, "position": self.position}

    def close(self) -> None:
        self.closed = True

    def resume(self, states) -> None:
        self.resumed = states


def test_a_size_change_rebuilds_the_loader_at_its_position_and_validation_keeps_model_img_size(
        monkeypatch, tmp_path, ontology):
    monkeypatch.delenv(ENV_VAR, raising=False)
    built = []

    def build(staged, ontology, **kwargs):
        built.append((RecordingLoader(staged), kwargs))
        return built[-1][0]

    monkeypatch.setattr(stages_module, "build_loader", build)
    cfg = tiny("train.steps=10", "train.stages=[{until_step: 2, img_size: 32, mask_ratio: 0.25}, {}]")
    model = build_model(cfg.model, len(ontology))
    first = RecordingLoader(position=7)
    c = SimpleNamespace(engine=SimpleNamespace(module=model), loader=first, loss_fn=PretrainLoss(cfg, ontology),
                        flops=None, ontology=ontology)
    schedule = StageSchedule(cfg, cpu_env(), tmp_path)
    schedule.enter(c, 1)
    new, kwargs = built[0]
    assert first.closed and c.loader is new and model.img_size == 32
    assert new.resumed == [{"epoch": 0, "position": 7}]      # every rank's state, as from a checkpoint
    assert (new.cfg.model.img_size, new.cfg.mask.mask_ratio, kwargs["run_dir"]) == (32, 0.25, tmp_path)
    assert cfg.model.img_size == 64 and cfg.mask.mask_ratio == 0.5   # the run's config is left alone
    with schedule.at_model_size(c):
        assert model.img_size == 64
    assert model.img_size == 32
    new.position = 2
    schedule.enter(c, 2)
    assert len(built) == 1                                     # inside a stage nothing is rebuilt
    schedule.enter(c, 3)
    assert model.img_size == 64 and new.closed and built[1][0].resumed == [{"epoch": 0, "position": 2}]


def cpu_env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launcher="single")


# ------------------------------------------------------------------ model
def _layout(model):
    return {k: (id(p), tuple(p.shape)) for k, p in model.named_parameters()}


def test_set_input_size_keeps_every_parameter_and_runs_at_both_sizes():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, hpm_units=cfg.model.img_size // cfg.mask.mask_patch_size).eval()
    layout, keys = _layout(model), {k: v.shape for k, v in model.state_dict().items()}
    x64, m64 = torch.rand(2, 1, 64, 64), torch.randint(0, 2, (2, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x64, m64)["recon"]
        model.set_input_size(32)
        assert _layout(model) == layout and {k: v.shape for k, v in model.state_dict().items()} == keys
        out = model(torch.rand(2, 1, 32, 32), torch.randint(0, 2, (2, 16, 16), dtype=torch.uint8))
        assert out["recon"].shape == (2, 1, 32, 32) and out["logits"].shape == (2, 10)
        assert out["difficulty"].shape == (2, 2, 2)          # 16-px mask units at 32 px
        with pytest.raises(ValueError, match=r"input must be \(B, 1, 32, 32\)"):
            model(x64, m64)                                   # the input check follows the stage
        model.set_input_size(64)
        assert torch.equal(model(x64, m64)["recon"], before)  # back at 64 px: the very same network


def test_set_input_size_refuses_a_size_that_would_resize_parameters_and_changes_nothing():
    cfg = load_config("tiny_cpu")  # window 4: at 32 px the last 2x2 grid would shrink the window
    model = build_model(cfg.model, 10)
    layout = _layout(model)
    with pytest.raises(ValueError, match="Swin stage 3 would run 2x2 windows on its 2x2 grid"):
        model.set_input_size(32)
    assert _layout(model) == layout and model.img_size == 64
    with pytest.raises(ValueError, match="not a positive multiple of the patch size"):
        model.set_input_size(33)
    assert model(torch.rand(1, 1, 64, 64), None)["recon"].shape == (1, 1, 64, 64)
