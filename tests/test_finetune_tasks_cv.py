"""The dense tasks (landmarks, detection with masks, enhancement) through `echocare finetune` with
`finetune.folds=2`: group-aware K folds with one run and one result per fold, and MLflow (a file
store under tmp_path) holding each fold's task metrics and its figures as images with a step.
Kept cheap: the tiny preset at 64 px, one epoch, 8 synthetic scans."""
from __future__ import annotations

import json
import re

import pytest
from mlflow import MlflowClient

from finetune_helpers import exported  # noqa: F401 - fixtures are found by name

from echocare_dist.cli import main
from echocare_dist.finetune.runner import TASK_METRICS
from echocare_dist.synth.tasks import generate_task_sets

FIGURE = {"landmarks": "overlays", "detection": "overlays", "enhancement": "before_after"}


@pytest.mark.slow
def test_dense_tasks_run_k_folds_and_log_metrics_and_figures_to_mlflow(tmp_path, exported, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store otherwise
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = (tmp_path / "mlruns").as_uri()
    data = tmp_path / "data"
    generate_task_sets(data, 8)
    where = {"landmarks": f"finetune.csv={data / 'landmarks/landmarks.csv'}",
             "detection": f"finetune.csv={data / 'detection/boxes.csv'}",
             "enhancement": f"finetune.data={data / 'enhancement'}"}
    client = MlflowClient(store)
    for task, source in where.items():
        run_dir = tmp_path / task
        args = [f"finetune.checkpoint={exported}", f"finetune.run_dir={run_dir}", f"finetune.task={task}", source,
                "finetune.folds=2", "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.bootstrap=10",
                "finetune.img_size=64", "tracking.enabled=true", f"tracking.uri={store}",
                f"finetune.experiment=cv-{task}"]
        assert main(["finetune", "--config", "tiny_cpu", *(f"--set={a}" for a in args)]) == 0, task
        assert "2-fold cross-validation" in capsys.readouterr().out
        cv = json.loads((run_dir / "cv.json").read_text())
        assert cv["folds"] == 2 and [f["fold"] for f in cv["per_fold"]] == [1, 2]
        metrics = TASK_METRICS[task]
        assert set(cv["metrics"]) == set(metrics)
        val_keys = []
        for fold in (1, 2):
            per_fold = json.loads((run_dir / f"fold_{fold}" / "metrics.json").read_text())
            assert per_fold["final"] == cv["per_fold"][fold - 1]["final"] and set(metrics) <= set(per_fold["final"])
            val_keys.append({line.split(",")[0] for line in (run_dir / f"fold_{fold}" / "split.csv").read_text()
                             .splitlines()[1:] if line.endswith(",val")})
            run = client.get_run(per_fold["mlflow_run_id"])
            assert run.info.run_name == f"{task}/fold_{fold}" and run.data.tags["echocare.task"] == task
            logged = {k for k in run.data.metrics if k.startswith("final_")}
            shown = {f"final_{m}" for m in metrics if per_fold["final"][m] == per_fold["final"][m]}  # not NaN
            assert shown and shown <= logged, (task, fold, logged)
            images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
            steps = {int(m.group(1)) for p in images if (m := re.match(rf"images/{FIGURE[task]}\+step\+(\d+)\+", p))}
            assert steps == {per_fold["best_epoch"]}, (task, images)
        assert val_keys[0] and val_keys[1] and not val_keys[0] & val_keys[1]  # every image validated once
    assert {"mask_ap", "mask_ap50"} <= set(json.loads((tmp_path / "detection" / "cv.json").read_text())["metrics"])
