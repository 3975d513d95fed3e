"""The README's main job, `echocare demo`, runs end to end and reports what it produced."""
from __future__ import annotations

import json
import subprocess

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_chain(python_exe, tmp_path):
    out = tmp_path / "demo out"
    proc = subprocess.run([python_exe, "-m", "echocare_dist.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("shards", "pretrain", "export", "finetune"):
        assert f"\n{stage}" in summary
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] > 50 and manifest["rejected"]["corrupt"]["count"] >= 1
    assert (out / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    losses = [json.loads(line)["loss"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    assert (out / "export" / "encoder.safetensors").stat().st_size > 0
    for run, task, metric in (("finetune-classification/pretrained", "classification", "val_auc"),
                              ("finetune-classification/random", "classification", "val_auc"),
                              ("finetune-segmentation", "segmentation", "val_dice_lesion")):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert metrics["task"] == task and metric in metrics["best"]
        assert (out / run / "best.safetensors").exists()
    # the summary ends with the evaluate table (3 methods) and says plainly it is a smoke test
    evaluation = json.loads((out / "finetune-classification" / "evaluate.json").read_text())
    assert list(evaluation["rows"]) == ["pretrained", "random init", "logreg 32x32 px"]
    tail = summary[summary.index("echocare evaluate: classification"):]
    assert all(name in tail for name in evaluation["rows"]) and "SMOKE TEST" in tail
    assert "2 ranks" in summary
    # ONE tracking store for the whole chain: the pretraining run holds the export, every
    # fine-tuning run names that pretraining run.
    from mlflow import MlflowClient
    assert (out / "mlflow.db").is_file() and not list(out.glob("*/mlflow.db")) and not list(out.glob("*/*/mlflow.db"))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (pretrain,) = client.search_runs([client.get_experiment_by_name("echocare-pretrain").experiment_id])
    assert {"export/encoder.safetensors", "export/config.json"} <= {
        a.path for a in client.list_artifacts(pretrain.info.run_id, "export")}
    finetunes = client.search_runs([client.get_experiment_by_name("echocare-finetune").experiment_id])
    assert len(finetunes) == 3 and {r.data.tags["echocare.pretrain_run_id"] for r in finetunes} == {pretrain.info.run_id}
