"""Tracking against real local MLflow stores (the file store and SQLite): run names from the run
directory, context tags, images with their step, system metrics, the export logged to its
pretraining run, and the fine-tuning tags that link back to it. The reconstruction grid's titles.
(The same against a real `mlflow server`, end to end: tests/test_mlflow_server.py.)"""
from __future__ import annotations

import getpass
import io
import json
import re
import socket
import time

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from echocare_dist import __version__
from echocare_dist.config import load_config
from echocare_dist.tracking import Tracker, resolve_tracking_uri
from echocare_dist.tracking_context import git_state, pretraining_link_tags
from echocare_dist.train.images import COLUMNS, reconstruction_grid, title_band_height


@pytest.fixture()
def file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store otherwise
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return (tmp_path / "mlruns").as_uri()


def _png(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    pattern = re.compile(rf"^images/{re.escape(key)}\+step\+(\d+)\+.*\.png$")
    return sorted(int(m.group(1)) for n in names if (m := pattern.match(n)))


def test_run_named_after_run_dir_with_context_tags_images_and_system_metrics(tmp_path, file_store, monkeypatch):
    monkeypatch.setenv("ECHOCARE_GIT_COMMIT", "f" * 40)  # an image built without .git records it so
    monkeypatch.setenv("ECHOCARE_GIT_DIRTY", "false")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "swin-l-run-7"
    t = Tracker(True, file_store, "exp", "", run_dir, source="echocare pretrain", launcher="slurm", world_size=4,
                system_metrics_s=0.2)
    run_id = t.start()
    t.log_image(_png(10), "reconstruction", step=3)
    t.log_image(_png(200), "reconstruction", step=5)
    deadline = time.time() + 60  # two samples of the system-metrics thread (slow on loaded CI cores)
    while t._system._monitor._logging_step < 2 and time.time() < deadline:
        time.sleep(0.05)
    t.finish("FINISHED")

    client = MlflowClient(file_store)
    run = client.get_run(run_id)
    tags = run.data.tags
    assert run.info.run_name == "swin-l-run-7" and run.info.status == "FINISHED"
    assert tags["mlflow.user"] == getpass.getuser() != "unknown"
    assert tags["mlflow.source.git.commit"] == "f" * 40 and tags["echocare.git_dirty"] == "false"
    assert tags["mlflow.source.name"] == "echocare pretrain" and tags["mlflow.source.type"] == "JOB"
    assert tags["echocare.version"] == __version__ and tags["echocare.host"] == socket.gethostname()
    assert tags["echocare.launcher"] == "slurm" and tags["echocare.world_size"] == "4"
    assert tags["echocare.slurm_job_id"] == "4242"
    assert _image_steps(client, run_id, "reconstruction") == [3, 5]
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert t._system is None  # the sampler thread was stopped and joined


def test_config_run_name_wins_and_resume_keeps_the_run(tmp_path, file_store):
    t = Tracker(True, file_store, "exp", "my name", tmp_path / "dir-name", launcher="single")
    run_id = t.start()
    t.finish("SCHEDULED")
    again = Tracker(True, file_store, "exp", "my name", tmp_path / "dir-name", launcher="deepspeed/torchrun",
                    world_size=2)
    assert again.start(resume_run_id=run_id) == run_id
    again.finish("FINISHED")
    run = MlflowClient(file_store).get_run(run_id)
    assert run.info.run_name == "my name"
    assert run.data.tags["echocare.launcher"] == "deepspeed/torchrun" and run.data.tags["echocare.world_size"] == "2"


def test_git_state_of_this_checkout(monkeypatch):
    monkeypatch.delenv("ECHOCARE_GIT_COMMIT", raising=False)
    state = git_state()
    from echocare_dist.paths import REPO_ROOT
    if (REPO_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and state["dirty"] in ("true", "false")
    else:
        assert state == dict(commit="unknown", dirty="unknown", branch="")


def test_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking_uri(f"sqlite:///{tmp_path}/shared/mlflow.db", tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path}/shared/mlflow.db"
    assert artifacts == (tmp_path / "shared" / "mlartifacts").as_uri()
    assert resolve_tracking_uri("http://mlflow:5000", tmp_path) == ("http://mlflow:5000", None)
    assert resolve_tracking_uri("", tmp_path / "run")[1] == (tmp_path / "run" / "mlartifacts").as_uri()


@pytest.fixture()
def pretraining_run(tmp_path, file_store):
    t = Tracker(True, file_store, "echocare-pretrain", "", tmp_path / "pretrain")
    run_id = t.start()
    t.finish("FINISHED")
    return run_id


def test_export_is_logged_to_its_pretraining_run_and_fine_tuning_links_back(tmp_path, file_store, pretraining_run):
    from echocare_dist.export import write_export
    from echocare_dist.export_tracking import log_export
    from echocare_dist.models import build_model
    from echocare_dist.ontology import load_ontology

    cfg = load_config("tiny_cpu", [f"tracking.uri={file_store}", "tracking.experiment=echocare-pretrain"])
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    out = tmp_path / "export"
    meta = write_export(build_model(cfg.model, len(onto)).state_dict(), cfg, out,
                        provenance=dict(step=5, mlflow_run_id=pretraining_run))
    assert json.loads((out / "encoder.json").read_text())["source"]["mlflow_run_id"] == pretraining_run
    assert log_export(meta, out, cfg, run_dir=None)

    client = MlflowClient(file_store)
    run = client.get_run(pretraining_run)
    assert run.info.status == "FINISHED"  # attached to, not reopened
    assert run.data.tags["echocare.export_sha256"] == meta["files"]["encoder"]["sha256"]
    logged = {a.path for a in client.list_artifacts(pretraining_run, "export")}
    assert {"export/encoder.json", "export/encoder.safetensors", "export/config.json",
            "export/model.safetensors", "export/README.md"} <= logged

    link = pretraining_link_tags(meta)
    ft = Tracker(True, file_store, "echocare-finetune", "", tmp_path / "ft", source="echocare finetune", tags=link)
    ft_id = ft.start()
    ft.finish("FINISHED")
    ft_tags = client.get_run(ft_id).data.tags
    assert ft_tags["echocare.pretrain_run_id"] == pretraining_run
    assert ft_tags["echocare.export_sha256"] == meta["files"]["encoder"]["sha256"]
    found = client.search_runs([client.get_experiment_by_name("echocare-finetune").experiment_id],
                               f"tags.`echocare.pretrain_run_id` = '{pretraining_run}'")
    assert [r.info.run_id for r in found] == [ft_id]


def test_export_of_an_untracked_run_is_not_logged(tmp_path, file_store):
    from echocare_dist.export_tracking import log_export
    cfg = load_config("tiny_cpu", [f"tracking.uri={file_store}"])
    meta = dict(source=dict(mlflow_run_id=None), files=dict(encoder=dict(sha256="0" * 64)))
    assert log_export(meta, tmp_path, cfg, run_dir=None) is False
    # A run directory whose store does not exist: nothing is created on the way.
    cfg = load_config("tiny_cpu")
    meta["source"]["mlflow_run_id"] = "abc"
    assert log_export(meta, tmp_path, cfg, run_dir=tmp_path / "run") is False
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_grid_title_band_names_each_column():
    H, p = 64, 8
    target = torch.rand(2, 1, H, H, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, H // p, H // p, dtype=torch.uint8)
    img = np.asarray(Image.open(io.BytesIO(reconstruction_grid((target - 0.5) / 0.5, mask, target, target,
                                                                0.5, 0.5, rows=2))))
    band = title_band_height(H)
    assert band >= 8 and img.shape == (band + 2 * H + 2, 4 * H + 6)
    for col in range(len(COLUMNS)):
        cell = img[:band, col * (H + 2):col * (H + 2) + H]
        dark = (cell < 128).sum()
        assert dark >= 10, f"column {COLUMNS[col]!r}: title band is blank"
        assert (cell > 200).mean() > 0.5  # dark text on white, not a tile spilling into the band
    # Different titles draw differently (not one smudge repeated).
    cells = [img[:band, c * (H + 2):c * (H + 2) + H] for c in range(len(COLUMNS))]
    assert len({c.tobytes() for c in cells}) == len(COLUMNS)
