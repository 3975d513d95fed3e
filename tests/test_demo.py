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
    for task, metric in (("classification", "val_auc"), ("segmentation", "val_dice")):
        metrics = json.loads((out / f"finetune-{task}" / "metrics.json").read_text())
        assert metrics["task"] == task and metric in metrics["best"]
        assert (out / f"finetune-{task}" / "best.safetensors").exists()
    assert "2 ranks" in summary
