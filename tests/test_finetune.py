"""Fine-tuning runner on small synthetic data: classification, segmentation, regression.

The encoder is the tiny preset's model exported with the same writer `echocare export` uses
(the DeepSpeed side of the export is covered in test_export.py). Images are PNG/JPEG/BMP, RGB
and gray, of odd sizes, in folders with spaces; masks are smaller than their images and of
another file type.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_helpers import exported  # noqa: F401 - fixtures are found by name

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError


SIZES = [(37, 53), (90, 61), (128, 200), (75, 75), (160, 96)]
FORMATS = [("png", "L"), ("jpg", "RGB"), ("bmp", "RGB"), ("png", "RGB"), ("jpg", "L")]


def _save(img: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img.astype(np.uint8), "L")
    (im.convert("RGB") if mode == "RGB" else im).save(path)


def _textured(rng, h, w, level) -> np.ndarray:
    return np.clip(level + rng.normal(0, 18, (h, w)), 0, 255)


def _cfg(tmp_path: Path, exported: Path, *overrides: str):
    return load_config("tiny_cpu", [f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'run'}",
                                    "finetune.epochs=2", "finetune.warmup_epochs=0", "tracking.enabled=false",
                                    *overrides])


@pytest.fixture(scope="module")
def bright_dark(tmp_path_factory) -> Path:
    """Folder-per-class data: 'bright images' vs 'dark images', mixed formats, sizes, colour."""
    root = tmp_path_factory.mktemp("cls data") / "my study"
    rng = np.random.default_rng(0)
    for cls, level in (("bright images", 190), ("dark images", 60)):
        for i in range(20):
            h, w = SIZES[i % len(SIZES)]
            ext, mode = FORMATS[i % len(FORMATS)]
            _save(_textured(rng, h, w, level), root / cls / f"case {i:02d}.{ext}", mode)
    return root


@pytest.mark.slow
def test_classification_learns_brightness_and_saves_best(tmp_path, exported, bright_dark):
    from echocare_dist.finetune.runner import Finetuner, load_finetuned

    cfg = _cfg(tmp_path, exported, "finetune.task=classification", f"finetune.data={bright_dark}",
               "finetune.val_fraction=0.25", "tracking.enabled=true")
    runner = Finetuner(cfg)
    summary = runner.run()
    run = tmp_path / "run"
    assert summary["class_names"] == ["bright images", "dark images"]
    assert (summary["num_train"], summary["num_val"]) == (30, 10)
    best = summary["best"]
    assert {"val_accuracy", "val_macro_f1", "val_auc", "val_loss", "train_loss"} <= set(best)
    assert best["val_accuracy"] > 0.5, summary["history"]  # chance is 0.5
    assert (run / "best.safetensors").is_file() and (run / "mlflow.db").is_file()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["best_epoch"] == summary["best_epoch"] == max(
        range(1, 3), key=lambda e: (summary["history"][e - 1]["val_macro_f1"], -e))
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    logged = client.get_metric_history(summary["mlflow_run_id"], "val_accuracy")
    assert [m.step for m in logged] == [1, 2]
    assert client.get_run(summary["mlflow_run_id"]).data.params["finetune.task"] == "classification"
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "path,split" and len(split) == 41 and any(" " in line for line in split[1:])

    # The saved best checkpoint reproduces the best epoch's validation metrics.
    model, info = load_finetuned(run)
    assert info["class_names"] == summary["class_names"]
    again = runner.evaluate(model.to(runner.device))
    assert again["accuracy"] == pytest.approx(best["val_accuracy"])
    assert again["auc"] == pytest.approx(best["val_auc"], abs=1e-6)


def test_linear_probe_with_csv_and_split_file_keeps_encoder_frozen(tmp_path, exported, bright_dark):
    from safetensors.torch import load_file

    from echocare_dist.finetune.runner import run_finetune

    rows, split = ["path,label"], ["path,split"]
    files = sorted(p for p in bright_dark.rglob("*") if p.is_file())
    for i, p in enumerate(files):
        rel = p.relative_to(bright_dark).as_posix()
        rows.append(f"{rel},{0 if p.parent.name.startswith('dark') else 1}")
        split.append(f"{rel},{'val' if i % 4 == 0 else 'train' if i % 4 != 1 else 'test'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "split.csv").write_text("\n".join(split) + "\n")
    cfg = _cfg(tmp_path, exported, "finetune.task=classification", f"finetune.data={bright_dark}",
               f"finetune.csv={tmp_path / 'labels.csv'}", f"finetune.split_file={tmp_path / 'split.csv'}",
               "finetune.mode=linear_probe", "finetune.lr=0.01", "finetune.epochs=1")
    summary = run_finetune(cfg)
    assert (summary["num_train"], summary["num_val"]) == (20, 10)  # the 'test' rows are left out
    assert summary["class_names"] == ["0", "1"]
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    encoder = load_file(str(exported))
    assert all(torch.equal(best[f"encoder.{k}"], v) for k, v in encoder.items())
    assert set(best) - {f"encoder.{k}" for k in encoder} == {"head.weight", "head.bias"}


def _shape_mask(h: int, w: int, rng) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[r0:r0 + h // 2, c0:c0 + w // 2] = 255
    return m


def test_segmentation_masks_of_other_size_and_format(tmp_path, exported):
    from echocare_dist.finetune.runner import run_finetune

    root = tmp_path / "seg data"
    rng = np.random.default_rng(1)
    for i in range(10):
        h, w = SIZES[i % len(SIZES)]
        mh, mw = max(h // 2, 8), max(w // 2, 8)      # masks at half resolution
        small = _shape_mask(mh, mw, rng)
        big = np.kron(small // 255, np.ones((2, 2)))[:h, :w]
        big = np.pad(big, ((0, h - big.shape[0]), (0, w - big.shape[1])))
        img = np.clip(50 + 150 * big + rng.normal(0, 10, (h, w)), 0, 255)
        ext, mode = FORMATS[i % len(FORMATS)]
        _save(img, root / "images" / "scan set" / f"im {i}.{ext}", mode)
        mask_dir = root / "masks" / "scan set"
        mask_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).save(mask_dir / f"im {i}_mask.{'bmp' if i % 2 else 'png'}")
    cfg = _cfg(tmp_path, exported, "finetune.task=segmentation", f"finetune.data={root}", "finetune.lr=0.003",
               "finetune.nsd_tolerance=2")
    summary = run_finetune(cfg)
    best = summary["best"]
    assert 0.0 <= best["val_dice"] <= 1.0 and 0.0 <= best["val_nsd"] <= 1.0
    assert summary["num_val"] == 2
    info = json.loads((tmp_path / "run" / "best.json").read_text())
    assert info["mask_mode"] == "binary" and info["num_outputs"] == 2
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_segmentation_multiclass_palette_masks_from_csv(tmp_path, exported):
    from echocare_dist.finetune.runner import run_finetune

    root = tmp_path / "multi"
    rng = np.random.default_rng(3)
    rows = ["path,mask"]
    for i in range(8):
        h, w = SIZES[i % len(SIZES)]
        ids = np.zeros((h // 3, w // 3), np.uint8)
        ids[: h // 6, : w // 6] = 1
        ids[h // 6:, w // 6:] = 2
        big = cv2_resize_nearest(ids, w, h)
        _save(np.clip(40 + 80 * big + rng.normal(0, 8, (h, w)), 0, 255), root / f"img {i}.png", "RGB")
        pal = Image.fromarray(ids, "P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
        pal.save(root / f"lab {i}.png")
        rows.append(f"img {i}.png,lab {i}.png")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, exported, "finetune.task=segmentation", f"finetune.csv={root / 'pairs.csv'}",
               "finetune.epochs=1", "finetune.val_fraction=0.25")
    summary = run_finetune(cfg)
    best = summary["best"]
    assert {"val_dice", "val_nsd", "val_dice_class1", "val_dice_class2"} <= set(best)
    assert best["val_dice"] == pytest.approx((best["val_dice_class1"] + best["val_dice_class2"]) / 2)
    info = json.loads((tmp_path / "run" / "best.json").read_text())
    assert info["mask_mode"] == "ids" and info["num_outputs"] == 3


def cv2_resize_nearest(ids: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2
    return cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST)


def test_regression_csv_via_cli(tmp_path, exported, capsys):
    from echocare_dist.cli import main

    root = tmp_path / "reg data"
    rng = np.random.default_rng(2)
    rows = ["path,value"]
    for i in range(15):
        level = float(rng.uniform(30, 220))
        h, w = SIZES[i % len(SIZES)]
        ext, mode = FORMATS[i % len(FORMATS)]
        _save(_textured(rng, h, w, level), root / f"scan {i}.{ext}", mode)
        rows.append(f"scan {i}.{ext},{level / 10:.3f}")
    (root / "targets.csv").write_text("\n".join(rows) + "\n")
    args = [f"--set={o}" for o in ("finetune.task=regression", f"finetune.csv={root / 'targets.csv'}",
                                   f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'run'}",
                                   "finetune.epochs=2", "tracking.enabled=false")]
    assert main(["finetune", "--config", "tiny_cpu", *args]) == 0
    out = capsys.readouterr().out
    assert "val_mae" in out and "best epoch" in out
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["monitor"] == "mae" and len(summary["history"]) == 2
    maes = [row["val_mae"] for row in summary["history"]]
    assert summary["best"]["val_mae"] == min(maes) and np.isfinite(maes).all()
    assert (tmp_path / "run" / "best.safetensors").is_file()


# ------------------------------------------------------------------------------ data rules
def test_mask_modes_and_refusals(tmp_path):
    from echocare_dist.finetune.data import (mask_to_ids, read_mask_values, resolve_mask_mode,
                                             scan_mask_values)

    palette = Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert read_mask_values(tmp_path / "p.png").tolist() == [[0, 1], [2, 2]]
    assert resolve_mask_mode({0, 1, 2}, "auto") == "ids"
    assert resolve_mask_mode({0, 255}, "auto") == "binary"
    assert mask_to_ids(np.array([0, 127, 128, 255]), "binary").tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="mask_mode"):
        resolve_mask_mode({0, 3, 200, 255}, "auto")  # a lossy JPEG mask: the user must choose
    Image.fromarray(np.dstack([np.zeros((3, 3), np.uint8), np.full((3, 3), 9, np.uint8),
                               np.zeros((3, 3), np.uint8)])).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour"):
        scan_mask_values([tmp_path / "colour.png"])


def test_data_errors_name_the_file(tmp_path, exported):
    from echocare_dist.finetune.runner import Finetuner

    root = tmp_path / "seg"
    _save(np.zeros((20, 20)), root / "images" / "a.png", "L")
    (root / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="have no mask.*a.png"):
        Finetuner(_cfg(tmp_path, exported, "finetune.task=segmentation", f"finetune.data={root}"))
    (tmp_path / "bad.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(DataError, match="header must name"):
        Finetuner(_cfg(tmp_path, exported, f"finetune.csv={tmp_path / 'bad.csv'}"))
    (tmp_path / "missing.csv").write_text("path,value\nnot here.png,1\n")
    with pytest.raises(DataError, match="not here.png"):
        Finetuner(_cfg(tmp_path, exported, "finetune.task=regression", f"finetune.csv={tmp_path / 'missing.csv'}"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from echocare_dist.finetune.data import read_gray
    with pytest.raises(DataError, match="broken.png"):
        read_gray(tmp_path / "broken.png")


def test_layer_decay_groups(exported):
    from echocare_dist.export import load_encoder
    from echocare_dist.finetune.model import build_task_model, param_groups

    model = build_task_model("classification", load_encoder(exported), 3, frozen=False, decoder_dim=16)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter exactly once
    named = dict(model.named_parameters())
    depth = sum(load_config("tiny_cpu").model.depths)  # blocks: 1+1+2+1 = 5
    assert scale_of[id(named["head.weight"])] == 1.0
    # timm's Swin grouping: one layer id per block from the top (the last block and the final norm
    # share the head's full LR), patch merging joins the first block of its stage, stem lowest.
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(0.5 ** depth)
    assert scale_of[id(named["encoder.norm.weight"])] == 1.0
    assert scale_of[id(named["encoder.layers.3.blocks.0.mlp.fc1.weight"])] == 1.0
    assert scale_of[id(named["encoder.layers.2.blocks.1.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert scale_of[id(named["encoder.layers.2.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.5 ** 2)
    assert scale_of[id(named["encoder.layers.2.downsample.reduction.weight"])] == pytest.approx(0.5 ** 2)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(named["encoder.layers.0.blocks.0.attn.relative_position_bias_table"])] == 0.0
    assert decay_of[id(named["head.bias"])] == 0.0 and decay_of[id(named["head.weight"])] == 0.05

    probe = build_task_model("segmentation", load_encoder(exported), 2, frozen=True, decoder_dim=16)
    trainable = {n for g in param_groups(probe, 0.05, 0.75) for n, p in probe.named_parameters()
                 if any(p is q for q in g["params"])}
    assert trainable and all(n.startswith("decoder.") for n in trainable)
    probe.train()
    assert not probe.encoder.training and probe.decoder.training
    assert probe(torch.zeros(2, 1, 64, 64)).shape == (2, 2, 64, 64)


# ------------------------------------------------------------------------------ the whole chain
@pytest.mark.slow
def test_pretrain_export_finetune_chain(tmp_path, tiny_shards, bright_dark):
    """2-rank ZeRO-2 pretraining (launch/pretrain.py under torchrun) -> `echocare export` -> fine-tune."""
    import train_launch as tl

    from echocare_dist.cli import main
    from echocare_dist.finetune.runner import run_finetune

    run_dir, log = tmp_path / "pretrain", tmp_path / "pretrain.log"
    rc = tl.run("torchrun", tl.base_overrides(run_dir, tiny_shards, train__steps=4, train__ckpt_every=2,
                                              train__zero_stage=2), log)
    assert rc == 0, tl.tail(log)
    export_dir = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(export_dir), "--no-progress"]) == 0
    meta = json.loads((export_dir / "encoder.json").read_text())
    assert (meta["source"]["step"], meta["source"]["world_size"], meta["source"]["zero_stage"]) == (4, 2, 2)

    summary = run_finetune(_cfg(tmp_path, export_dir / "encoder.safetensors", "finetune.task=classification",
                                f"finetune.data={bright_dark}", "finetune.val_fraction=0.25"))
    assert summary["best"]["val_accuracy"] > 0.5
