"""timm's own layout beside ours: `timm.create_model("local-dir:DIR", pretrained=True)` alone
rebuilds the encoder (same features as the trained model and as load_encoder), and
`timm.data.resolve_data_config` / `create_transform` preprocess as pretraining did (one channel,
our mean/std, the pretraining size, bilinear, no crop). The model card summarises the data (the
shards' manifest), ontology, steps, losses and provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from echocare_dist.atomic import file_sha256
from echocare_dist.config import load_config
from echocare_dist.data.testing import write_shards
from echocare_dist.export import ENCODER_FILE, META_FILE, load_encoder, write_export
from echocare_dist.export_card import CARD_FILE
from echocare_dist.export_timm import TIMM_CONFIG_FILE, TIMM_TAG, TIMM_WEIGHTS_FILE
from echocare_dist.models import build_model


def _trained_like_model(cfg, num_classes: int):
    torch.manual_seed(3)
    model = build_model(cfg.model, num_classes)
    with torch.no_grad():  # away from any initialisation timm could reproduce on its own
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from echocare_dist.ontology import load_ontology

    root = tmp_path_factory.mktemp("timm export")
    shards = root / "shards"
    cfg = load_config("tiny_cpu", [f"data.shards={shards}", "data.augment.norm_mean=0.3",
                                   "data.augment.norm_std=0.2"])
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    write_shards(shards, onto, counts=(5, 4))
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps(dict(step=1, loss=0.9125, loss_mim=0.5, loss_hie=0.4125)) + "\n"
        + json.dumps(dict(step=7, loss=0.4375, loss_mim=0.25, loss_hie=0.1875)) + "\n")
    model = _trained_like_model(cfg, len(onto))
    out = root / "export"
    write_export(model.state_dict(), cfg, out, license="cc-by-nc-4.0",
                 provenance=dict(run_dir=str(run_dir), step=7, zero_stage=2, world_size=2,
                                 mlflow_run_id="0123456789abcdef", checkpoint_dir=str(run_dir / "ckpt")))
    return out, model, cfg


def test_timm_local_dir_alone_gives_our_features(export_dir):
    out, model, cfg = export_dir
    size = cfg.model.img_size
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    probe = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encoder(probe)
        theirs = timm_model(probe)
        loaded = load_encoder(out)(probe)
    assert theirs.shape == ours.shape == (3, timm_model.num_features)
    assert torch.allclose(theirs, ours, atol=1e-6) and torch.allclose(theirs, loaded, atol=1e-6)


def test_resolve_data_config_preprocesses_like_pretraining(export_dir):
    out, _, cfg = export_dir
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True)
    data_cfg = timm.data.resolve_data_config(model=timm_model)
    size = cfg.model.img_size
    assert data_cfg["input_size"] == (1, size, size)
    assert tuple(data_cfg["mean"]) == (0.3,) and tuple(data_cfg["std"]) == (0.2,)  # lists, as JSON gives them
    assert data_cfg["interpolation"] == "bilinear" and data_cfg["crop_pct"] == 1.0
    # A uniform frame twice the size: resized (no crop), scaled to [0, 1], normalised with ours.
    transform = timm.data.create_transform(**data_cfg)
    x = transform(Image.fromarray(np.full((2 * size, 3 * size), 153, np.uint8), "L"))
    assert tuple(x.shape) == (1, size, size)
    assert torch.allclose(x, torch.full_like(x, (153 / 255 - 0.3) / 0.2), atol=1e-5)


def test_config_json_and_weights(export_dir):
    out, _, cfg = export_dir
    config = json.loads((out / TIMM_CONFIG_FILE).read_text())
    meta = json.loads((out / META_FILE).read_text())
    assert config["architecture"] == cfg.model.arch and config["num_classes"] == 0
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["img_size"] == cfg.model.img_size
    assert config["model_args"]["depths"] == meta["depths"] and config["model_args"]["window_size"] == meta["window_size"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["license"] == "cc-by-nc-4.0" and pcfg["tag"] == TIMM_TAG
    assert pcfg["input_size"] == [1, cfg.model.img_size, cfg.model.img_size]
    assert config["echocare"]["mlflow_run_id"] == "0123456789abcdef"
    # One set of weights: model.safetensors is encoder.safetensors, and encoder.json vouches for both.
    assert (out / TIMM_WEIGHTS_FILE).read_bytes() == (out / ENCODER_FILE).read_bytes()
    for key, name in (("timm_weights", TIMM_WEIGHTS_FILE), ("timm_config", TIMM_CONFIG_FILE),
                      ("model_card", CARD_FILE)):
        assert meta["files"][key]["file"] == name and meta["files"][key]["sha256"] == file_sha256(out / name)
    assert meta["source"]["mlflow_run_id"] == "0123456789abcdef"


def test_model_card_summarises_data_training_and_provenance(export_dir):
    out, _, cfg = export_dir
    card = (out / CARD_FILE).read_text()
    meta = json.loads((out / META_FILE).read_text())
    front = card.split("---")[1]
    assert "license: cc-by-nc-4.0" in front and "library_name: timm" in front
    from echocare_dist.shardfmt import Manifest
    manifest = Manifest.read(cfg.resolve_path(cfg.data.shards))
    assert f"{manifest.num_samples} grayscale ultrasound frames in {len(manifest.shards)} WebDataset shards" in card
    for source, count in manifest.per_source.items():
        assert f"| {source} | {count} |" in card
    assert meta["ontology"]["hash"] in card
    assert "| steps | 7 |" in card and "2 x ZeRO-2" in card
    assert "0.9125 -> 0.4375" in card and "0.4125 -> 0.1875" in card
    assert "0123456789abcdef" in card and meta["files"]["encoder"]["sha256"] in card
    assert 'local-dir:PATH/TO/THIS/FOLDER' in card


def test_card_says_when_the_data_is_unknown(tmp_path):
    from echocare_dist.ontology import load_ontology
    cfg = load_config("tiny_cpu", [f"data.shards={tmp_path / 'gone'}"])
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    write_export(_trained_like_model(cfg, len(onto)).state_dict(), cfg, tmp_path / "export")
    card = (tmp_path / "export" / CARD_FILE).read_text()
    assert "## Pretraining data\n\nNot recorded (" in card and "gone" in card
    assert "losses | not recorded (no run directory)" in card


def test_bf16_export_loads_in_timm(export_dir, tmp_path):
    _, model, cfg = export_dir
    out = tmp_path / "bf16"
    write_export(model.state_dict(), cfg, out, dtype="bf16")
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    probe = torch.rand(2, 1, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model.encoder(probe), timm_model(probe)
    assert theirs.dtype == torch.float32
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


def test_push_to_hub_refuses_a_folder_without_timm_files(tmp_path):
    """Checked before any network call (the upload itself is never run by the tests)."""
    from echocare_dist.export import ExportError
    from echocare_dist.export_timm import push_to_hub
    with pytest.raises(ExportError, match="config.json is missing"):
        push_to_hub(tmp_path, "someone/model")


def test_weights_are_copied_where_hard_links_are_refused(tmp_path, monkeypatch):
    import os

    from echocare_dist.export_timm import link_or_copy
    src, dst = tmp_path / "encoder.safetensors", tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(1 << 16))
    dst.write_bytes(b"an older export")
    link_or_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino == os.stat(src).st_ino  # linked

    def refuse(*_):
        raise PermissionError("hard links not supported on this file system")
    monkeypatch.setattr(os, "link", refuse)
    again = tmp_path / "copy.safetensors"
    link_or_copy(src, again)
    assert again.read_bytes() == src.read_bytes() and os.stat(again).st_ino != os.stat(src).st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "encoder.safetensors",
                                                          "model.safetensors"]  # no temp file left
