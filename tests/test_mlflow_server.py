"""A short training, its export and a fine-tuning of it log to one real `mlflow server` over HTTP
(MLFLOW_TRACKING_URI): params, metrics, system metrics, context tags, the DeepSpeed config and the
reconstruction grids (images with their step) arrive, artifacts in the server's store; the export
is logged to the pretraining run and the fine-tuning run is tagged with it."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_launch as tl

pytestmark = pytest.mark.slow


@pytest.fixture()
def mlflow_server(tmp_path):
    port = tl.free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [str(tl.BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"mlflow server did not come up:\n{tl.tail(log)}")
            time.sleep(0.5)
        yield url, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker(s): a group we started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tiny_classes(root: Path) -> Path:
    """Two classes of textured frames, enough for one fine-tuning epoch."""
    rng = np.random.default_rng(0)
    for cls, level in (("bright", 190), ("dark", 60)):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            img = np.clip(level + rng.normal(0, 18, (72, 96)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"case{i}.png")
    return root


def _image_steps(client, run_id: str, key: str) -> list[int]:
    pattern = re.compile(rf"^images/{re.escape(key)}\+step\+(\d+)\+.*\.png$")
    return sorted(int(m.group(1)) for a in client.list_artifacts(run_id, "images") if (m := pattern.match(a.path)))


def test_training_export_and_finetuning_log_to_one_tracking_server(mlflow_server, tmp_path, tiny_shards,
                                                                   monkeypatch):
    from mlflow import MlflowClient

    from echocare_dist.config import load_config
    from echocare_dist.export import export_checkpoint
    from echocare_dist.finetune.runner import run_finetune
    from echocare_dist.train.images import title_band_height

    url, store = mlflow_server
    run_dir, log = tmp_path / "tiny-pretrain", tmp_path / "train.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=4, train__log_every=2, train__image_every=2,
                                  train__ckpt_every=1000, tracking__enabled="true",
                                  tracking__experiment="server-test", tracking__system_metrics_interval=1)
    rc = tl.run("python", overrides, log, nproc=1, extra_env={"MLFLOW_TRACKING_URI": url})
    assert rc == 0, tl.tail(log)
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "mlartifacts").exists()

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "tiny-pretrain" and run.info.status == "FINISHED"  # named after its run dir
    assert run.data.params["train.steps"] == "4" and run.data.params["model.arch"] == "swin_tiny_patch4_window7_224"
    assert run.data.params["run.world_size"] == "1"
    tags = run.data.tags
    assert tags["mlflow.user"] not in ("", "unknown") and tags["mlflow.source.name"] == "echocare pretrain"
    assert tags["echocare.launcher"] == "single" and tags["echocare.world_size"] == "1"
    assert tags["mlflow.source.git.commit"] and tags["echocare.host"] and tags["echocare.version"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    for key in ("lr", "images_per_s", "mfu", "mem_gb", "data_wait_s", "loss_mim", "loss_hie"):
        assert key in run.data.metrics, key
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)

    # Reconstruction grids as images with their step (the UI's slider), titled columns on top.
    assert _image_steps(client, run_id, "reconstruction") == [2, 4]
    grid = [a.path for a in client.list_artifacts(run_id, "images")
            if a.path.startswith("images/reconstruction+step+4+") and a.path.endswith(".png")][0]
    local = client.download_artifacts(run_id, grid, str(tmp_path / "dl"))
    with open(local, "rb") as fh:
        img = Image.open(io.BytesIO(fh.read()))
    img.load()
    size = 64  # tiny preset img_size; 4 rows (tracking.image_rows) x 4 columns, 2-px separators
    assert img.size == (4 * size + 6, title_band_height(size) + 4 * size + 6)
    configs = {a.path for a in client.list_artifacts(run_id, "config")}
    assert configs == {"config/deepspeed_config.json", "config/config.resolved.yaml"}
    # Proxied artifacts: the files live in the server's store, uploaded over HTTP.
    assert list(store.joinpath("artifacts").rglob("reconstruction+step+4+*.png"))

    # The export is logged to the pretraining run (found through the id the checkpoint kept).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    export = tmp_path / "export"
    meta = export_checkpoint(run_dir, export, progress=False)
    assert meta["source"]["mlflow_run_id"] == run_id
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/encoder.safetensors", "export/encoder.json", "export/config.json", "export/README.md"} <= logged
    again = client.get_run(run_id)
    assert again.data.tags["echocare.export_sha256"] == meta["files"]["encoder"]["sha256"]
    assert again.info.status == "FINISHED"

    # A fine-tuning run of that export, in the same server, tagged with the pretraining run.
    ft_dir = tmp_path / "ft-cls"
    cfg = load_config("tiny_cpu", [f"finetune.checkpoint={export}", f"finetune.data={_tiny_classes(tmp_path / 'cls')}",
                                   f"finetune.run_dir={ft_dir}", "finetune.epochs=1", "finetune.warmup_epochs=0",
                                   "finetune.bootstrap=0", "finetune.val_fraction=0.34", "tracking.enabled=true",
                                   "tracking.system_metrics_interval=0"])
    summary = run_finetune(cfg)
    ft = client.get_run(summary["mlflow_run_id"])
    assert ft.data.tags["echocare.pretrain_run_id"] == run_id
    assert ft.data.tags["echocare.export_sha256"] == meta["files"]["encoder"]["sha256"]
    assert ft.info.run_name == f"{tmp_path.name}/ft-cls"
    assert _image_steps(client, ft.info.run_id, "curves") == [summary["best_epoch"]]
