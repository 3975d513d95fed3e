"""A short training logs to a real `mlflow server` over HTTP (MLFLOW_TRACKING_URI): params, metrics,
the DeepSpeed config and the reconstruction grids arrive, artifacts in the server's store."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import time
import urllib.request

import pytest

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


def test_training_logs_to_a_tracking_server(mlflow_server, tmp_path, tiny_shards):
    from mlflow import MlflowClient
    from PIL import Image

    url, store = mlflow_server
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=4, train__log_every=2, train__image_every=2,
                                  train__ckpt_every=1000, tracking__enabled="true",
                                  tracking__experiment="server-test", tracking__run_name="tiny")
    rc = tl.run("python", overrides, log, nproc=1, extra_env={"MLFLOW_TRACKING_URI": url})
    assert rc == 0, tl.tail(log)
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "mlartifacts").exists()

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4" and run.data.params["model.arch"] == "swin_tiny_patch4_window7_224"
    assert run.data.params["run.world_size"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    for key in ("lr", "images_per_s", "mfu", "mem_gb", "data_wait_s", "loss_mim", "loss_hie"):
        assert key in run.data.metrics, key

    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "reconstructions"))
    assert grids == ["reconstructions/recon_step_00000002.png", "reconstructions/recon_step_00000004.png"]
    local = client.download_artifacts(run.info.run_id, grids[-1], str(tmp_path / "dl"))
    with open(local, "rb") as fh:
        img = Image.open(io.BytesIO(fh.read()))
    img.load()
    size = 64  # tiny preset img_size; 4 rows (tracking.image_rows) x 4 columns, 2-px separators
    assert img.size == (4 * size + 6, 4 * size + 6)
    configs = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert configs == {"config/deepspeed_config.json", "config/config.resolved.yaml"}
    # Proxied artifacts: the files live in the server's store, uploaded over HTTP.
    assert list(store.joinpath("artifacts").rglob("recon_step_00000004.png"))
