"""Config: presets load, overrides apply, and bad values fail before any work with a clear message."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from echocare_dist.config import ConfigError, find_preset, load_config, save_resolved
from echocare_dist.models.archs import swin_layout

PRESETS = ["tiny_cpu", "echocare_swin_l", "echocare_swin_l_p4", "echocare_swin_b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.model.img_size % cfg.mask.mask_patch_size == 0


def test_paper_presets_follow_the_report():
    l2, l4, b = (load_config(n) for n in ("echocare_swin_l", "echocare_swin_l_p4", "echocare_swin_b"))
    assert (l2.model.patch_size, l4.model.patch_size) == (2, 4)
    assert swin_layout(l2.model)["embed_dim"] == 192 and swin_layout(b.model)["embed_dim"] == 128
    assert l2.model.img_size == 256 and l2.model.window_size == 8
    assert l2.mask.mask_ratio == 0.5 and l2.mask.mask_patch_size == 32
    assert l2.train.micro_batch * 8 == 256  # global batch 256 on one 8-GPU node
    assert l2.optim.lr == 1e-4 and l2.optim.warmup_steps == 10000 and l2.train.steps == 1_000_000
    assert l2.optim.betas == (0.9, 0.999) and l2.optim.grad_clip == 5.0
    # inheritance: p4 only changes what it states
    assert l4.optim == l2.optim and l4.mask == l2.mask


def test_overrides_are_typed():
    cfg = load_config("tiny_cpu", ["train.steps=7", "optim.betas=[0.8, 0.9]", "tracking.enabled=false",
                                   "model.decoder=linear", "optim.lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.tracking.enabled is False and cfg.model.decoder == "linear"
    assert cfg.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, message", [
    ("model.nope=1", "'model.nope'"),
    ("train.steps=many", "train.steps: expected an integer, got 'many'"),
    ("model.decoder=fancy", "model.decoder: value 'fancy' is not one of"),
    ("model.img_size=72", "not divisible by mask.mask_patch_size"),
    ("mask.mask_patch_size=1", "not divisible by model.patch_size"),
    ("model.window_size=5", "does not divide the stage-0 grid"),
    ("train.zero_stage=4", "train.zero_stage must be 0..3"),
    ("mask.mask_ratio=1.5", "mask.mask_ratio must be in [0, 1]"),
    ("tracking.enabled=yes please", "tracking.enabled: expected true/false"),
    ("model.arch=resnet50", "model.arch='resnet50' is not one of"),
    ("train=3", "train: expected a mapping"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert message in str(info.value)


def test_window_must_divide_paper_grids():
    # patch 2 at 256 gives grids 128/64/32/16: window 8 works, window 12 does not
    load_config("echocare_swin_l", ["model.window_size=8"])
    with pytest.raises(ConfigError, match="window_size=12"):
        load_config("echocare_swin_l", ["model.window_size=12"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("does_not_exist")


def test_bad_yaml_file_is_named(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(p))


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text(f"base: {load_config.__module__ and ''}d.yaml\ntrain:\n  steps: 5\n")
    (tmp_path / "d.yaml").write_text("name: d\ntrain:\n  steps: 9\n  micro_batch: 3\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.name, cfg.train.steps, cfg.train.micro_batch) == ("d", 5, 3)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny_cpu", ["train.steps=11"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 11


def test_sections_validate_themselves():
    from echocare_dist.config import AugmentConfig, DataConfig, TrainConfig
    with pytest.raises(ConfigError, match=r"train\.zero_stage must be 0\.\.3, got 4"):
        TrainConfig(zero_stage=4).validate()
    # a nested section names its full dotted key
    with pytest.raises(ConfigError, match=r"data\.augment\.hflip_prob must be in \[0, 1\], got 2"):
        DataConfig(augment=AugmentConfig(hflip_prob=2.0)).validate("data")
    with pytest.raises(ConfigError, match="mask.mask_patch_size must be positive, got 0"):
        load_config("tiny_cpu", ["mask.mask_patch_size=0"])


def test_deprecated_wds_loader_becomes_pil_with_a_warning():
    from echocare_dist.config import config_from_dict
    with pytest.warns(FutureWarning, match=r"data\.loader='wds' is deprecated, use data\.loader='pil'"):
        cfg = load_config("tiny_cpu", ["data.loader=wds"])
    assert cfg.data.loader == "pil"
    saved = cfg.to_dict()
    saved["data"]["loader"] = "wds"          # a config saved before the rename
    with pytest.warns(FutureWarning, match="data.loader"):
        assert config_from_dict(saved).data.loader == "pil"
    assert saved["data"]["loader"] == "wds"  # the caller's dict is left as it was


def test_config_args_with_resume():
    import argparse

    from echocare_dist.cli_args import add_config_args, config_from_args
    plain = argparse.ArgumentParser()
    add_config_args(plain)
    args = plain.parse_args(["--set", "train.steps=3"])
    assert config_from_args(args).train.steps == 3 and config_from_args(args).train.resume == "auto"
    with pytest.raises(SystemExit):
        plain.parse_args(["--resume", "none"])   # only the commands that resume take --resume
    resuming = argparse.ArgumentParser()
    add_config_args(resuming, resume=True)
    assert config_from_args(resuming.parse_args(["--resume", "none"])).train.resume == "none"


def test_config_imports_neither_torch_nor_timm(python_exe):
    import subprocess
    code = ("import sys, echocare_dist.config, echocare_dist.cli_args, echocare_dist.models.archs\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))\n"
            "assert not heavy, heavy\n")
    subprocess.run([python_exe, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# --set: the text is read with the type of the field it sets (docs/configuration.md)
# --------------------------------------------------------------------------------------
def test_set_strings_stay_strings():
    cfg = load_config("tiny_cpu", ["tracking.run_name=2024-01-15", "tracking.experiment=on",
                                   "tracking.uri=", "finetune.data=007", "train.resume=null"])
    assert cfg.tracking.run_name == "2024-01-15"      # YAML would make it a date
    assert cfg.tracking.experiment == "on"            # YAML would make it True
    assert cfg.tracking.uri == "" and cfg.finetune.data == "007" and cfg.train.resume == "null"


def test_set_lists_and_tuples_are_parsed_and_element_checked():
    cfg = load_config("tiny_cpu", ["model.depths=[1, 1, 2, 1]", "optim.betas=[0.8,0.95]",
                                   "train.preempt_signals=[SIGTERM]", 'curation.mask_name_patterns=["*_m*", on]'])
    assert cfg.model.depths == (1, 1, 2, 1) and cfg.optim.betas == (0.8, 0.95)
    assert cfg.train.preempt_signals == ("SIGTERM",)
    assert cfg.curation.mask_name_patterns == ("*_m*", "on")  # list items that are strings stay strings
    assert load_config("tiny_cpu", ["model.embed_dim=null"]).model.embed_dim is None


@pytest.mark.parametrize("override, message", [
    ("model.depths=[1,x,2,1]", "model.depths[1]: expected an integer, got 'x'"),
    ("optim.betas=[0.9", "optim.betas: malformed list '[0.9'"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values, got 1"),
    ("optim.betas=0.9", "optim.betas: expected a list"),
    ("model.num_heads=[1, 2.5]", "model.num_heads[1]: expected an integer, got '2.5'"),
    ("tracking.enabled=on", "tracking.enabled: expected true/false"),
    ("tracking.enabled=yes", "tracking.enabled: expected true/false"),
    ("train.steps=1.0", "train.steps: expected an integer, got '1.0'"),
    ("train.steps=1e3", "train.steps: expected an integer, got '1e3'"),
    ("train.steps=true", "train.steps: expected an integer, got 'true'"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("optim.lr=nan", "optim.lr: expected a finite number"),
    ("model.arch.depth=3", "model.arch is a value, not a section"),
    ("model..arch=x", "has an empty key"),
    ("train.steps", "must look like key.sub=value"),
])
def test_set_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert message in str(info.value)


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True),
                                         ("false", False), ("FALSE", False), ("0", False)])
def test_set_bools_only_from_true_false_1_0(text, value):
    assert load_config("tiny_cpu", [f"tracking.enabled={text}"]).tracking.enabled is value


def test_set_numbers_are_strict_but_complete():
    cfg = load_config("tiny_cpu", ["optim.lr=1", "optim.min_lr=3e-6", "train.steps=+12"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == pytest.approx(3e-6) and cfg.train.steps == 12


def test_yaml_lists_are_element_checked_too(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("base: " + str(find_preset("tiny_cpu")) + "\nmodel:\n  depths: [1, x, 2, 1]\n")
    with pytest.raises(ConfigError, match=r"model\.depths\[1\]: expected an integer, got 'x'"):
        load_config(str(p))


# --------------------------------------------------------------------------------------
# Relative paths: one rule, independent of what exists (docs/configuration.md)
# --------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_cwd_whatever_exists(tmp_path, monkeypatch):
    from echocare_dist.paths import REPO_ROOT
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny_cpu")
    assert cfg.resolve_path(cfg.train.run_dir) == tmp_path / "runs" / "tiny_cpu"
    (tmp_path / "runs" / "tiny_cpu").mkdir(parents=True)
    assert cfg.resolve_path(cfg.train.run_dir) == tmp_path / "runs" / "tiny_cpu"
    # a path that exists in the checkout but not here is still taken from here (no fallback)
    assert (REPO_ROOT / "echocare_dist" / "config.py").exists()
    assert cfg.resolve_path("echocare_dist/config.py") == tmp_path / "echocare_dist" / "config.py"
    assert cfg.resolve_path("~/x") == Path.home() / "x" and cfg.resolve_path("/abs/y") == Path("/abs/y")


def test_ontology_path_in_a_config_file_is_relative_to_that_file(tmp_path, monkeypatch):
    shutil.copy(find_preset("tiny_cpu").parent / "ontology" / "default.yaml", tmp_path / "my_onto.yaml")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "onto.yaml").write_text((tmp_path / "my_onto.yaml").read_text())
    (tmp_path / "base" / "b.yaml").write_text("ontology:\n  path: onto.yaml\ntrain:\n  run_dir: runs/b\n")
    (tmp_path / "child.yaml").write_text("base: base/b.yaml\nname: child\n")
    (tmp_path / "own.yaml").write_text("base: base/b.yaml\nontology:\n  path: my_onto.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    child = load_config(str(tmp_path / "child.yaml"))
    assert child.ontology.path == str(tmp_path / "base" / "onto.yaml")  # the base file wrote it
    assert child.resolve_path(child.train.run_dir) == elsewhere / "runs" / "b"  # data/outputs: the cwd
    assert load_config(str(tmp_path / "own.yaml")).ontology.path == str(tmp_path / "my_onto.yaml")
    # --set values are relative to the cwd, like everything typed on a command line
    cfg = load_config(str(tmp_path / "child.yaml"), ["ontology.path=local.yaml"])
    assert cfg.resolve_path(cfg.ontology.path) == elsewhere / "local.yaml"


def test_presets_and_their_ontology_load_from_any_cwd(tmp_path, monkeypatch):
    from echocare_dist.config import preset_names
    from echocare_dist.ontology import load_ontology
    from echocare_dist.paths import DEFAULT_ONTOLOGY
    monkeypatch.chdir(tmp_path)
    assert set(PRESETS) <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert Path(cfg.ontology.path) == DEFAULT_ONTOLOGY
        assert len(load_ontology(cfg.resolve_path(cfg.ontology.path))) > 50
    from echocare_dist.config import Config
    assert Path(Config().ontology.path) == DEFAULT_ONTOLOGY  # the default needs no config file
