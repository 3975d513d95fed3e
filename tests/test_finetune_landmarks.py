"""finetune.task=landmarks: annotation reading and refusals, sub-pixel decoding, coordinates, a
training run on the synthetic breast scans (`echocare synth --tasks`), `echocare evaluate`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from finetune_helpers import exported, flat_image  # noqa: F401 - fixtures are found by name

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError
from echocare_dist.finetune.tasks import landmarks as L
from echocare_dist.synth.tasks import generate_task_sets


def test_csv_and_json_annotations_read_the_same_points(tmp_path):
    flat_image(tmp_path / "a b.png", 40, 30)
    (tmp_path / "pts.csv").write_text("path,apex_x,apex_y,base_x,base_y,spacing\na b.png,3.5,4,39,29,0.2\n")
    names, rows = L.read_landmarks(tmp_path / "pts.csv", tmp_path)
    assert names == ["apex", "base"]
    assert rows[0][1] == ((3.5, 4.0), (39.0, 29.0)) and rows[0][2] == 0.2
    (tmp_path / "pts.json").write_text(json.dumps(
        {"landmarks": ["apex", "base"],
         "images": [{"path": "a b.png", "points": [[3.5, 4], [39, 29]], "spacing": 0.2}]}))
    names_j, rows_j = L.read_landmarks(tmp_path / "pts.json", tmp_path)
    assert names_j == names and rows_j[0][1] == rows[0][1]
    (tmp_path / "xy.csv").write_text("path,x1,y1,x2,y2\na b.png,1,1,2,2\n")
    assert L.read_landmarks(tmp_path / "xy.csv", tmp_path)[0] == ["point1", "point2"]


@pytest.mark.parametrize("text, message", [
    ("path,x1,y1\na.png,40.5,3\n", "lies outside the image"),
    ("path,x1,y1\na.png,3,-2\n", "lies outside the image"),
    ("path,x1,y1\na.png,3\n", "line 2: 2 columns, the header has 3"),
    ("path,x1,y1\nmissing.png,3,3\n", "'missing.png' not found"),
    ("path,x1,y1\na.png,three,3\n", "is not a number"),
    ("path,x1,z1\na.png,3,3\n", "not an x,y pair"),
    ("path,x1,y1,spacing\na.png,3,3,0\n", "spacing 0 must be positive"),
])
def test_malformed_landmarks_name_the_file_and_line(tmp_path, text, message):
    flat_image(tmp_path / "a.png", 40, 30)
    (tmp_path / "pts.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        L.read_landmarks(tmp_path / "pts.csv", tmp_path)
    assert "pts.csv" in str(err.value)


def test_decoding_is_sub_pixel_and_coordinates_round_trip():
    size, sigma = 32, 2.0
    truth = np.array([[10.3, 20.7], [3.6, 5.2], [30.8, 31.0]])  # the last one at the border
    grid = np.arange(size)
    maps = [np.exp(-((grid[None, :] - x) ** 2 + (grid[:, None] - y) ** 2) / (2 * sigma ** 2)) for x, y in truth]
    logits = torch.log(torch.tensor(np.stack(maps), dtype=torch.float32) + 1e-9)[None]
    decoded = L.decode_heatmaps(logits, sigma)[0]
    assert np.abs(decoded[:2] - truth[:2]).max() < 0.1  # an argmax alone is off by up to 0.5 px
    assert np.abs(decoded[2] - truth[2]).max() <= 0.5  # at the border the window shrinks: no inward pull
    pts = np.array([[0.0, 0.0], [99.0, 49.0], [12.25, 30.5]])
    there = L.to_input_coords(pts, 100, 50, 64)
    assert np.allclose(L.to_original_coords(there, 100, 50, 64), pts)


def test_summary_counts_success_within_radii_and_mm():
    errors = np.array([[1.0, 3.0], [5.0, 12.0]])
    s = L.landmark_summary(errors, np.array([0.5, 0.5]))
    assert s["mre"] == pytest.approx(5.25) and s["mse"] == pytest.approx((1 + 9 + 25 + 144) / 4)
    assert (s["sdr_2"], s["sdr_4"], s["sdr_10"]) == (0.25, 0.5, 0.75)
    assert s["mre_mm"] == pytest.approx(5.25 * 0.5)
    assert math.isnan(L.landmark_summary(errors, np.array([0.5, math.nan]))["mre_mm"])


def test_loss_is_lowest_at_the_true_point():
    target = torch.tensor([[[8.0, 12.0]]])
    grid = torch.arange(24.0)

    def peak_at(x, y):
        return (-((grid[None, :] - x) ** 2 + (grid[:, None] - y) ** 2) / 4.0)[None, None]
    ft = load_config("tiny_cpu").finetune
    right = L.LandmarkTask().loss(peak_at(8, 12), target, ft)
    wrong = L.LandmarkTask().loss(peak_at(15, 3), target, ft)
    assert right < wrong


def test_synth_cli_writes_the_task_sets(tmp_path, capsys):
    from echocare_dist.cli import main

    rc = main(["synth", "--config", "tiny_cpu", "--out", str(tmp_path / "s"), "--tasks", "6",
               "--set", "synth.num_images=30", "--set", "synth.num_videos=0", "--set", "synth.num_dicom=0",
               "--set", "synth.num_dicom_single=0", "--set", "synth.min_size=96", "--set", "synth.max_size=128"])
    assert rc == 0
    tasks = tmp_path / "s" / "tasks"
    names, rows = L.read_landmarks(tasks / "landmarks" / "landmarks.csv", tasks / "landmarks")
    assert names == ["top", "bottom", "left", "right"] and 1 <= len(rows) <= 6
    for path, pts, spacing, _ in rows:  # the top point is the lesion's highest pixel row
        assert pts[0][1] <= min(p[1] for p in pts) and spacing > 0
    assert len(list((tasks / "enhancement" / "low").glob("*.png"))) == 6
    assert "fine-tuning task sets" in capsys.readouterr().out
    assert main(["synth", "--config", "tiny_cpu", "--out", str(tmp_path / "t"), "--tasks", "2"]) == 2


@pytest.mark.slow
def test_landmarks_train_report_and_evaluate_with_two_folds_on_synthetic_scans(tmp_path, exported, capsys):
    from echocare_dist.finetune.checkpoints import load_finetuned
    from echocare_dist.finetune.evaluate import run_evaluate

    generate_task_sets(tmp_path / "data", 14)
    csv = tmp_path / "data" / "landmarks" / "landmarks.csv"
    cfg = load_config("tiny_cpu", [f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'ev'}",
                                   "finetune.task=landmarks", f"finetune.csv={csv}", "finetune.epochs=2",
                                   "finetune.warmup_epochs=0", "finetune.bootstrap=50", "finetune.lr=1e-3",
                                   "finetune.folds=2", "tracking.enabled=false"])
    summary = run_evaluate(cfg)
    table = capsys.readouterr().out
    assert "mean position" in table and "pretrained" in table and "random init" in table
    assert "mean +- std over 2 folds" in table and len(summary["rows"]["random init"]) == 2
    final = summary["rows"]["pretrained"][0]
    assert 0 <= final["sdr_2"] <= final["sdr_4"] <= final["sdr_10"] <= 1
    assert final["mre"] > 0 and np.isfinite(final["mre_mm"]) and final["mre_mm"] < final["mre"]
    run = tmp_path / "ev" / "pretrained" / "fold_1"
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert (run / "overlays.png").stat().st_size > 0
    model, info = load_finetuned(run)
    assert info["task"] == "landmarks" and info["class_names"] == ["top", "bottom", "left", "right"]
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


@pytest.mark.parametrize("override, key", [("finetune.heatmap_sigma=0", "finetune.heatmap_sigma"),
                                           ("finetune.max_detections=0", "finetune.max_detections"),
                                           ("finetune.task=keypoints", "finetune.task")])
def test_new_options_are_validated_by_name(override, key):
    from echocare_dist.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", [override])
