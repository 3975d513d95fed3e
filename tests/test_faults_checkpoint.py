"""Fault injection, checkpoint side (issue 11, items 6 and 8): damaged checkpoint files, a full disk
during a save, damaged or incomplete exports, checkpoints whose pickles run code, credentials in
the tracking URI. Each test injects one fault and asserts it ends cleanly (a clear error naming
the file, the previous checkpoint intact, nothing executed, nothing leaked). The data-side
triggers are in test_faults_data.py; `-m fault` runs both and prints the fault table."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import train_launch as tl  # shared launcher environment of the multi-process tests

from echocare_dist.config import load_config, save_resolved
from echocare_dist.export import ExportError, export_checkpoint, load_encoder, read_export_meta, write_export
from echocare_dist.models import build_model
from echocare_dist.ontology import load_ontology
from echocare_dist.train import checkpoint as ckpt
from echocare_dist.train import distributed

pytestmark = pytest.mark.fault
REPO = Path(__file__).resolve().parent.parent
SINGLE = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launcher="single")


_MODEL: dict = {}


def tiny_model_state(cfg) -> tuple[dict, str]:
    """(state_dict, ontology hash) of the tiny preset's model, built once for the module."""
    if not _MODEL:
        onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
        torch.manual_seed(0)
        _MODEL.update(state=build_model(cfg.model, len(onto)).state_dict(), hash=onto.hash)
    return _MODEL["state"], _MODEL["hash"]


class Zero0Engine:
    """Writes what a ZeRO-0 DeepSpeed engine writes for one rank (the module inside the model
    states), plus whatever `extra` objects a test wants pickled into it; `fail` raises instead."""

    def __init__(self, cfg, extra: dict | None = None, fail: BaseException | None = None):
        self.cfg, self.extra, self.fail = cfg, extra or {}, fail
        self.module, self.ontology_hash = tiny_model_state(cfg)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise self.fail
        torch.save(dict(module=self.module, ds_config={"zero_optimization": {"stage": 0}}, dp_world_size=1,
                        ds_version="0.19.8", **client_state, **self.extra), d / "mp_rank_00_model_states.pt")


def _save(mgr, cfg, engine, step: int):
    meta = dict(world_size=1, zero_stage=0, ontology_hash=engine.ontology_hash,
                model=ckpt.model_fingerprint(cfg.model))
    client = dict(step=step, config=cfg.to_dict(), ontology_hash=engine.ontology_hash)
    return mgr.save(engine, step, client, meta)


@pytest.fixture()
def run(tmp_path, tiny_config):
    """A run directory with one complete ZeRO-0 checkpoint (step 10) written through CheckpointManager."""
    mgr = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints", SINGLE, keep_last=3)
    engine = Zero0Engine(tiny_config)
    _save(mgr, tiny_config, engine, 10)
    return tmp_path / "run", mgr, engine


def _flip(path: Path, offset: int = -4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ item 6: hashes in the marker
def test_marker_records_every_file_and_resume_refuses_a_damaged_one(run, tiny_config):
    run_dir, mgr, engine = run
    tag_dir = run_dir / "checkpoints" / "step_00000010"
    meta = json.loads((tag_dir / "meta.json").read_text())
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt"}
    assert mgr.plan_resume("auto", tiny_config, engine.ontology_hash).tag == "step_00000010"
    _flip(tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.ResumeError, match="mp_rank_00_model_states.pt: SHA-256 differs"):
        mgr.plan_resume("auto", tiny_config, engine.ontology_hash)


def test_export_refuses_a_damaged_checkpoint_file(run, tmp_path):
    run_dir, _, _ = run
    meta = export_checkpoint(run_dir, tmp_path / "ok", progress=False)   # intact: exports
    assert meta["source"]["step"] == 10
    _flip(run_dir / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt")
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt: SHA-256 differs"):
        export_checkpoint(run_dir, tmp_path / "bad", progress=False)


# ------------------------------------------------------------------ item 6: failed save
@pytest.mark.parametrize("where", ["engine", "marker"])
def test_disk_full_during_save_keeps_latest_and_names_path_and_space(run, tiny_config, monkeypatch, where):
    run_dir, mgr, engine = run
    root = run_dir / "checkpoints"
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if where == "engine":
        failing = Zero0Engine(tiny_config, fail=enospc)
    else:
        failing = engine

        def full(path, obj, indent=2):
            raise enospc

        monkeypatch.setattr(ckpt, "atomic_write_json", full)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        _save(mgr, tiny_config, failing, 20)
    message = str(info.value)
    assert str(root / "step_00000020") in message and "No space left on device" in message
    assert "GiB free of" in message and "step_00000010" in message
    assert (root / "latest").read_text().strip() == "step_00000010"
    previous = root / "step_00000010"
    assert ckpt.verify_files(previous, json.loads((previous / "meta.json").read_text())) == []
    assert not (root / "step_00000020" / "meta.json").exists()


DISK_FULL_RUN = textwrap.dedent('''
    import errno, sys, time
    from pathlib import Path
    import torch
    from echocare_dist.config import load_config
    from echocare_dist.data.testing import write_shards
    from echocare_dist.ontology import load_ontology
    from echocare_dist.train.trainer import pretrain

    out = Path(sys.argv[1])
    base = load_config("tiny_cpu")
    write_shards(out / "shards", load_ontology(base.resolve_path(base.ontology.path)), counts=(8, 8))
    cfg = load_config("tiny_cpu", [f"data.shards={out / 'shards'}", f"train.run_dir={out / 'run'}",
                                   "train.zero_stage=2", "train.micro_batch=2", "train.steps=2", "train.ckpt_every=1",
                                   "train.resume=none", "tracking.enabled=false", "data.num_threads=2"])
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the disk fills up during the second checkpoint
        if "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    torch.save = save
    t0 = time.monotonic()
    try:
        code = pretrain(cfg)
    except Exception as exc:
        print(f"FAILED after {time.monotonic() - t0:.1f}s: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print(f"EXIT {code}", flush=True)
    sys.exit(code)
''')


@pytest.mark.slow
def test_disk_full_in_a_deepspeed_run_fails_fast_and_keeps_the_previous_checkpoint(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_RUN)
    env = {k: v for k, v in tl.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=400)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FAILED"))
    assert "CheckpointSaveError" in line and "step_00000002" in line and "No space left" in line, line
    assert "GiB free of" in line, line
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    previous = root / "step_00000001"
    assert ckpt.verify_files(previous, json.loads((previous / "meta.json").read_text())) == []
    assert elapsed < 300, f"took {elapsed:.0f} s"


# ------------------------------------------------------------------ item 6: loading exports
@pytest.fixture(scope="module")
def export_once(tmp_path_factory):
    cfg = load_config("tiny_cpu")
    out = tmp_path_factory.mktemp("fault export") / "export"
    write_export(tiny_model_state(cfg)[0], cfg, out)
    return out


@pytest.fixture()
def exported(export_once, tmp_path):
    """A fresh copy of a valid export of the tiny model, for one test to damage."""
    import shutil
    return Path(shutil.copytree(export_once, tmp_path / "export"))


def _rehash(export: Path) -> None:
    """encoder.json vouching for the current (damaged) file: only the safetensors check is left."""
    from echocare_dist.atomic import file_sha256
    meta = json.loads((export / "encoder.json").read_text())
    meta["files"]["encoder"]["sha256"] = file_sha256(export / "encoder.safetensors")
    (export / "encoder.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "no_arch", "no_files", "truncated_rehashed",
                                    "garbage_rehashed"])
def test_damaged_or_incomplete_export_is_a_clear_error(exported, damage):
    weights, meta_path = exported / "encoder.safetensors", exported / "encoder.json"
    if damage.startswith("truncated"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage.startswith("garbage"):
        data = bytearray(weights.read_bytes())
        data[:8] = (2**62).to_bytes(8, "little")   # header length far past the end of the file
        data[8:40] = os.urandom(32)
        weights.write_bytes(bytes(data))
    else:
        meta = json.loads(meta_path.read_text())
        del meta["arch" if damage == "no_arch" else "files"]
        meta_path.write_text(json.dumps(meta))
    if damage.endswith("rehashed"):
        _rehash(exported)
    with pytest.raises(ExportError) as info:
        load_encoder(weights)
    named = str(meta_path) if damage.startswith("no_") else str(weights)
    assert named in str(info.value)


def test_finetune_cli_exits_2_naming_the_file(exported, tmp_path, capsys):
    meta_path = exported / "encoder.json"
    meta = json.loads(meta_path.read_text())
    del meta["arch"]
    meta_path.write_text(json.dumps(meta))
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
    from echocare_dist.cli import main
    rc = main(["finetune", "--config", "tiny_cpu", "--set", f"finetune.checkpoint={exported / 'encoder.safetensors'}",
               "--set", f"finetune.data={data}", "--set", f"finetune.run_dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(meta_path) in err and "'arch'" in err and "Traceback" not in err
    with pytest.raises(ExportError, match="'arch'"):
        read_export_meta(exported)


# ------------------------------------------------------------------ item 8: security
class RunsCode:
    """Unpickling this calls os.mkdir(path): the stand-in for any code an untrusted checkpoint runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_export_never_runs_code_from_a_checkpoint(tmp_path, tiny_config):
    evidence = tmp_path / "code ran"
    mgr = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints", SINGLE, keep_last=3)
    _save(mgr, tiny_config, Zero0Engine(tiny_config, extra={"payload": RunsCode(str(evidence))}), 10)
    with pytest.raises(ExportError, match="refusing .*mkdir"):
        export_checkpoint(tmp_path / "run", tmp_path / "out", progress=False)
    assert not evidence.exists()


class OldEnumPickle:
    """Pickles like Python 3.11.0-3.11.4 pickle an enum member: getattr(EnumClass, name)."""

    def __init__(self, cls, name: str):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_enum_members_pickled_through_getattr_load_and_nothing_else_does(tmp_path):
    # The container's Python (3.11.2) writes DeepSpeed's ZeroStageEnum this way into every ZeRO
    # optimizer file: such a checkpoint must load; a getattr reaching anything else must not.
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from echocare_dist.safe_load import check_pickle, torch_load_safe

    good = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": OldEnumPickle(ZeroStageEnum, "gradients"), "w": torch.ones(2)}, good)
    assert "builtins.getattr" in check_pickle(good)
    loaded = torch_load_safe(good)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and torch.equal(loaded["w"], torch.ones(2))
    evidence = tmp_path / "code ran"
    for name, payload in (("not_a_member", OldEnumPickle(ZeroStageEnum, "__init__")),
                          ("not_an_enum", OldEnumPickle(LossScaler, "__init__")),
                          ("chained", (OldEnumPickle(ZeroStageEnum, "gradients"), RunsCode(str(evidence))))):
        bad = tmp_path / f"{name}.pt"
        torch.save({"x": payload}, bad)
        with pytest.raises(ExportError, match="refusing"):
            check_pickle(bad)
    assert not evidence.exists()


def test_every_torch_load_has_weights_only_true():
    import ast
    offenders, calls = [], 0
    for path in [*REPO.glob("echocare_dist/**/*.py"), *REPO.glob("kernels/*.py"), *REPO.glob("launch/*.py"),
                 *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load" \
                    and isinstance(func.value, ast.Name) and func.value.id == "torch":
                calls += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls > 0 and offenders == []


SECRET_URI = "https://alice:s3cr3t-pw@mlflow.example.org:5000/?token=t0k3n&x=1"


def test_credentials_never_reach_files_params_or_messages(tmp_path, tiny_config, monkeypatch, capsys):
    from echocare_dist import tracking
    from echocare_dist.cli import main

    tiny_config.tracking.uri = SECRET_URI
    text = save_resolved(tiny_config, tmp_path).read_text()
    assert "s3cr3t" not in text and "t0k3n" not in text and "alice:***@mlflow.example.org" in text
    params = tracking.flatten(tiny_config.to_dict())
    assert params["tracking.uri"] == "https://alice:***@mlflow.example.org:5000/?token=***&x=1"

    logged = []

    class Client:  # MLflow's client as far as the Tracker uses it; errors quote the URI like MLflow's do
        def __init__(self, tracking_uri):
            assert tracking_uri == SECRET_URI  # the real one still reaches the client
            self.uri = tracking_uri

        def get_experiment_by_name(self, name):
            from mlflow.exceptions import MlflowException
            raise MlflowException(f"API request to {self.uri}api/2.0/mlflow/experiments/get-by-name failed")

    import mlflow
    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    tracker = tracking.Tracker(True, SECRET_URI, "exp", "", tmp_path)
    with pytest.raises(tracking.TrackingError) as info:
        tracker.start()
    logged.append(str(info.value))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    assert main(["config", "show", "--config", "tiny_cpu"]) == 0
    logged.append(capsys.readouterr().out)
    from echocare_dist.preflight import Problem
    logged.append(str(Problem("tracking.uri", SECRET_URI, f"cannot connect to {SECRET_URI}")))
    for text in logged:
        assert "s3cr3t" not in text and "t0k3n" not in text, text


def test_docs_show_no_unauthenticated_public_mlflow_server():
    for doc in [REPO / "README.md", *REPO.glob("docs/*.md")]:
        text = doc.read_text()
        assert "--host 0.0.0.0" not in text, doc
    assert "--app-name basic-auth" in (REPO / "docs" / "cluster.md").read_text()
