"""finetune.task=detection: box CSV / COCO JSON reading and refusals, CenterNet target encoding and
decoding, COCO AP with pycocotools, and a training run on the synthetic breast scans."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError
from echocare_dist.finetune.tasks import detection as D
from echocare_dist.synth.tasks import generate_task_sets


def _image(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), 90, np.uint8)).save(path)
    return path


def test_csv_and_coco_give_the_same_boxes_and_empty_images_count(tmp_path):
    _image(tmp_path / "im" / "a.png", 50, 40)
    _image(tmp_path / "im" / "b.png", 30, 30)
    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2,label\nim/a.png,1,2,11,22,mass\nim/a.png,20,5,50,40,cyst\n"
                                        "im/b.png,,,,,\n")
    names, rows = D.read_boxes(tmp_path / "boxes.csv", tmp_path)
    assert names == ["cyst", "mass"]
    by_name = {p.name: t for p, t in rows}
    assert by_name["a.png"].boxes == ((1, 2, 11, 22, 1), (20, 5, 50, 40, 0)) and by_name["b.png"].boxes == ()
    coco = dict(images=[dict(id=1, file_name="im/a.png"), dict(id=2, file_name="im/b.png")],
                categories=[dict(id=7, name="cyst"), dict(id=9, name="mass")],
                annotations=[dict(image_id=1, bbox=[1, 2, 10, 20], category_id=9),
                             dict(image_id=1, bbox=[20, 5, 30, 35], category_id=7)])
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    names_c, rows_c = D.read_boxes(tmp_path / "boxes.json", tmp_path)
    assert names_c == names and {p.name: t.boxes for p, t in rows_c} == {p.name: t.boxes for p, t in rows}


@pytest.mark.parametrize("text, message", [
    ("path,x1,y1,x2,y2\na.png,10,2,5,8\n", "has x2 <= x1"),
    ("path,x1,y1,x2,y2\na.png,1,2,5,60\n", "extends outside the image"),
    ("path,x1,y1,x2,y2\na.png,1,2,5\n", "line 2: 4 columns, the header has 5"),
    ("path,x1,y1,x2,y2\ngone.png,1,2,5,6\n", "'gone.png' not found"),
    ("path,x,y,w,h\na.png,1,2,5,6\n", "header must be path,x1,y1,x2,y2"),
])
def test_malformed_boxes_name_the_file_and_line(tmp_path, text, message):
    _image(tmp_path / "a.png", 50, 40)
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        D.read_boxes(tmp_path / "b.csv", tmp_path)
    assert "b.csv" in str(err.value)


def test_coco_refuses_an_unknown_image_id(tmp_path):
    _image(tmp_path / "a.png", 50, 40)
    (tmp_path / "c.json").write_text(json.dumps(dict(images=[dict(id=1, file_name="a.png")],
                                                     annotations=[dict(image_id=3, bbox=[1, 1, 2, 2])])))
    with pytest.raises(DataError, match=r"c.json annotations\[0\]: image_id 3"):
        D.read_boxes(tmp_path / "c.json", tmp_path)


def test_perfect_maps_decode_to_the_encoded_boxes():
    boxes = np.array([[4.0, 6.0, 20.0, 18.0, 0], [30.0, 30.0, 60.0, 50.0, 1]])
    t = D.encode_targets(boxes, 2, 64)
    logits = torch.logit(t[:2].clamp(1e-4, 1 - 1e-4))  # heatmaps as the head would ideally predict them
    out = torch.cat([logits, t[2:6]])[None]
    decoded = D.decode_boxes(out, 2, 10)[0]
    best = decoded[np.argsort(-decoded[:, 5])][:2]
    best = best[np.argsort(best[:, 4])]
    assert np.allclose(best[:, :5], boxes, atol=1e-4)


def test_coco_ap_perfect_shifted_and_missing():
    truth = [np.array([[10, 10, 30, 30, 0]], float), np.array([[5, 5, 15, 25, 0]], float)]
    sizes = [(64, 64), (64, 64)]
    perfect = [np.c_[t, np.ones(1)] for t in truth]
    assert D.coco_ap(truth, perfect, sizes, 1) == pytest.approx((1.0, 1.0))
    shifted = [p + np.array([[6, 0, 6, 0, 0, 0]]) for p in perfect]
    ap, ap50 = D.coco_ap(truth, shifted, sizes, 1)
    assert ap < 0.6 and ap < ap50
    assert D.coco_ap(truth, [np.zeros((0, 6))] * 2, sizes, 1) == (0.0, 0.0)


def test_focal_loss_prefers_the_right_centre():
    t = D.encode_targets(np.array([[8.0, 8.0, 24.0, 24.0, 0]]), 1, 32)[None]
    ft = load_config("tiny_cpu").finetune
    good = torch.cat([torch.logit(t[:, :1].clamp(1e-3, 1 - 1e-3)), t[:, 1:5]], dim=1)
    bad = torch.cat([torch.roll(good[:, :1], shifts=9, dims=3), t[:, 1:5]], dim=1)
    assert D.DetectionTask().loss(good, t, ft) < D.DetectionTask().loss(bad, t, ft)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from echocare_dist.export import write_export
    from echocare_dist.models import build_model
    from echocare_dist.ontology import load_ontology

    cfg = load_config("tiny_cpu")
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny export")
    write_export(build_model(cfg.model, len(onto)).state_dict(), cfg, out)
    return out / "encoder.safetensors"


@pytest.mark.slow
def test_detection_trains_on_synthetic_scans_and_reports_ap(tmp_path, exported):
    from echocare_dist.finetune.runner import run_finetune

    generate_task_sets(tmp_path / "data", 14)
    cfg = load_config("tiny_cpu", [f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'run'}",
                                   "finetune.task=detection", f"finetune.csv={tmp_path / 'data/detection/boxes.csv'}",
                                   "finetune.epochs=2", "finetune.warmup_epochs=0", "finetune.bootstrap=20",
                                   "finetune.lr=1e-3", "tracking.enabled=true"])
    summary = run_finetune(cfg)
    final = summary["final"]
    assert 0.0 <= final["box_ap"] <= final["box_ap50"] <= 1.0
    assert summary["class_names"] == ["lesion"] and summary["num_val"] >= 2
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    run = tmp_path / "run"
    assert (run / "overlays.png").stat().st_size > 0 and (run / "best.safetensors").is_file()
    assert summary["mlflow_run_id"]


def test_boxes_and_extreme_points_from_busi_like_masks(tmp_path):
    from echocare_dist.finetune.tasks.from_masks import main
    from echocare_dist.finetune.tasks.landmarks import read_landmarks

    data = tmp_path / "busi"
    for name, mode in (("benign (1)", "L"), ("malignant (1)", "1"), ("normal (1)", "L")):
        _image(data / name.split()[0] / f"{name}.png", 60, 40)
        mask = np.zeros((40, 60), np.uint8)
        if name.startswith("benign"):
            mask[5:15, 10:30] = 255   # the larger lesion
            mask[25:35, 40:48] = 255
        elif name.startswith("malignant"):
            mask[20:30, 5:25] = 255   # saved as a 1-bit image: must read as foreground, not as 0/1 ids
        Image.fromarray(mask).convert(mode).save(data / name.split()[0] / f"{name}_mask.png")
    assert main([str(data), str(tmp_path / "ann")]) == 0
    names, rows = D.read_boxes(tmp_path / "ann" / "boxes.csv", data)
    boxes = {p.name: t.boxes for p, t in rows}
    assert boxes["benign (1).png"] == ((10, 5, 30, 15, 0), (40, 25, 48, 35, 0))
    assert boxes["malignant (1).png"] == ((5, 20, 25, 30, 0),) and boxes["normal (1).png"] == ()
    point_names, points = read_landmarks(tmp_path / "ann" / "landmarks.csv", data)
    by_image = {p.name: pts for p, pts, _, _ in points}
    assert point_names == ["top", "bottom", "left", "right"] and "normal (1).png" not in by_image
    assert by_image["benign (1).png"] == ((19.5, 5.0), (19.5, 14.0), (10.0, 9.5), (29.0, 9.5))
