"""Pretraining engine components in one process: launcher env, DeepSpeed config, LR schedule
(shared with fine-tuning), peak-FLOPs table, MLflow, image grid (checkpoints and the preemption
flag: test_train_checkpoints.py)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from echocare_dist import hardware
from echocare_dist.config import ConfigError, load_config
from echocare_dist.finetune import runner as finetune_runner
from echocare_dist.schedule import warmup_cosine
from echocare_dist.train import distributed
from echocare_dist.train.optim import WarmupCosine, deepspeed_config, scaled_lr


# ------------------------------------------------------------------ launcher environment
def test_env_from_torchrun_and_deepspeed_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    got = distributed.detect_env(env)
    assert (got["rank"], got["world_size"], got["local_rank"], got["master_addr"]) == (3, 8, 1, "n1")


def test_env_from_srun_translates_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08,11]", "SLURM_JOB_ID": "4321", "SLURM_NTASKS": "16"}
    got = distributed.detect_env(env)
    assert (got["rank"], got["world_size"], got["local_rank"], got["launcher"]) == (5, 16, 1, "slurm")
    assert got["master_addr"] == "gpu07"
    assert got["master_port"] == str(20000 + 4321 % 20000)


def test_env_in_a_batch_script_without_srun_is_single_process():
    # sbatch exports SLURM_PROCID/SLURM_NTASKS to the one batch process; only srun sets STEP_NUM_TASKS.
    got = distributed.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (got["rank"], got["world_size"], got["launcher"]) == (0, 1, "single")


def test_env_rejects_rank_outside_world():
    with pytest.raises(RuntimeError, match="rank 4 of world size 4"):
        distributed.detect_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5]", "a3"), ("gpu[10,2-3],cpu1", "gpu10")])
def test_first_host_of_nodelist(nodelist, first):
    assert distributed.first_host(nodelist) == first


# ------------------------------------------------------------------ DeepSpeed config and schedule
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_our_config(stage):
    cfg = load_config("tiny_cpu", [f"train.zero_stage={stage}", "train.grad_accum=3", "optim.grad_clip=2.5",
                                   "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["train_batch_size"] == cfg.train.micro_batch * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 2.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["steps_per_print"] == cfg.train.log_every
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "fp16" not in ds and "bf16" not in ds
    assert ds["zero_force_ds_cpu_optimizer"] is False
    json.dumps(ds)  # written to the run dir as JSON


def test_deepspeed_config_fp32_offload_and_universal():
    cfg = load_config("tiny_cpu", ["train.zero_stage=2", "train.offload_optimizer=true", "train.precision=fp32"])
    ds = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"), load_universal=True)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_autocast" not in ds and "fp16" not in ds
    assert ds["checkpoint"]["load_universal"] is True
    assert ds["zero_optimization"]["overlap_comm"] is False  # no CUDA streams on the CPU


def test_config_validation_of_engine_fields():
    with pytest.raises(ConfigError, match="offload_optimizer"):
        load_config("tiny_cpu", ["train.offload_optimizer=true", "train.zero_stage=0"])
    with pytest.raises(ConfigError, match="SIGFOO"):
        load_config("tiny_cpu", ["train.preempt_signals=[SIGTERM, SIGFOO]"])
    with pytest.raises(ConfigError, match="requeue_exit_code"):
        load_config("tiny_cpu", ["train.requeue_exit_code=0"])


def test_lr_scales_with_global_batch():
    cfg = load_config("tiny_cpu", ["optim.lr=1e-3", "optim.lr_batch_ref=16", "optim.min_lr=1e-5",
                                   "train.micro_batch=8", "train.grad_accum=2"])
    peak, floor = scaled_lr(cfg, world_size=4)  # global batch 64 = 4 x reference
    assert peak == pytest.approx(4e-3) and floor == pytest.approx(4e-5)


def _schedule(total=100, warmup=10, kind="cosine"):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupCosine(opt, peak_lr=1.0, min_lr=0.01, warmup_steps=warmup, total_steps=total, schedule=kind)


def test_warmup_then_cosine_shape():
    s = _schedule()
    lrs = [s.lr_at(i) for i in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))            # linear warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))     # cosine falls
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5)               # half way
    assert lrs[100] == pytest.approx(0.01)
    assert _schedule(kind="constant").lr_at(80) == 1.0


def test_schedule_resume_keeps_position_but_takes_new_length():
    s = _schedule(total=100)
    for _ in range(30):
        s.optimizer.step()
        s.step()
    state = s.state_dict()
    longer = _schedule(total=1000)
    longer.load_state_dict(state)
    assert longer.last_epoch == 30
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(longer.lr_at(30))
    assert longer.lr_at(30) > s.lr_at(30)  # the extended run decays more slowly


@pytest.mark.parametrize("peak,floor,warmup,total", [(1.0, 0.01, 10, 100), (3e-4, 0.0, 0, 37), (2e-3, 1e-5, 7, 7)])
def test_pretraining_and_finetuning_share_one_schedule(peak, floor, warmup, total):
    """The DeepSpeed client scheduler, stepped as the engine steps it, writes into the optimizer
    exactly the LR that fine-tuning sets per step (both through schedule.warmup_cosine)."""
    assert finetune_runner.warmup_cosine is warmup_cosine
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = WarmupCosine(opt, peak_lr=peak, min_lr=floor, warmup_steps=warmup, total_steps=total)
    for step in range(total + 3):
        assert opt.param_groups[0]["lr"] == warmup_cosine(step, peak, floor, warmup, total), step
        opt.step()
        sched.step()
    assert warmup_cosine(total + 5, peak, floor, warmup, total) == pytest.approx(floor)
    with pytest.raises(ValueError, match="'linear'"):
        warmup_cosine(0, peak, floor, warmup, total, schedule="linear")


# ------------------------------------------------------------------ peak FLOPs table
@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA B200", "B200"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", None), ("NVIDIA L40", None), ("NVIDIA GeForce RTX 4090", None)])
def test_device_names_match_their_peak_row(name, key):
    assert hardware.match_device(name) == key


def test_peak_tflops_reads_the_table_for_the_training_precision(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_tflops(cuda, "bf16") == (756.5, "spec table (H100 PCIe bf16 dense)")
    matmul = torch.backends.cuda.matmul  # a module-level flag object: monkeypatch cannot restore it
    allow_tf32 = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert hardware.peak_tflops(cuda, "fp32")[0] == 378.0
        matmul.allow_tf32 = False
        assert hardware.peak_tflops(cuda, "fp32")[0] == 51.2
    finally:
        matmul.allow_tf32 = allow_tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hardware.peak_tflops(cuda, "bf16")[0] == 989.4   # SXM: not the PCIe row
    for name, bf16 in (("NVIDIA H200", 989.4), ("NVIDIA B200", 2250.0), ("NVIDIA L40S", 362.05),
                       ("NVIDIA A100-SXM4-80GB", 312.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert hardware.peak_tflops(cuda, "fp16")[0] == bf16, name
    assert hardware.peak_tflops(cuda, "bf16", configured=123.0) == (123.0, "train.peak_tflops")
    for row in hardware.PEAK_TFLOPS.values():  # dense tensor-core rates sit above the CUDA-core fp32 one
        assert set(row) == {"bf16", "fp16", "tf32", "fp32"} and row["bf16"] > row["tf32"] > row["fp32"]


def test_peak_tflops_on_cpu_is_a_measurement_that_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    peak, source = hardware.peak_tflops(torch.device("cpu"), "fp32")
    assert peak > 0 and source == "measured CPU matmul"
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ tracking and images
def test_flatten_and_tracking_uri(tmp_path, monkeypatch):
    from echocare_dist.tracking import flatten, resolve_tracking_uri
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking_uri("", tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and artifacts.startswith("file://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("", tmp_path) == ("http://127.0.0.1:1", None)
    assert resolve_tracking_uri("http://other:5000", tmp_path)[0] == "http://other:5000"


def test_embedded_mlflow_run_is_reopened_on_resume(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from echocare_dist.tracking import Tracker
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = Tracker(True, "", "exp", "r", tmp_path)
    run_id = t.start()
    t.log_params({"train.steps": "10", "model.arch": "x"})
    t.log_metrics({"loss": 1.5}, step=3)
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG fake")
    t.log_artifact(png, "reconstructions")
    t.finish("SCHEDULED")

    again = Tracker(True, "", "exp", "r", tmp_path)
    assert again.start(resume_run_id=run_id) == run_id
    again.log_params({"train.steps": "20", "model.arch": "x", "new.key": "1"})
    again.log_metrics({"loss": 1.0}, step=4)
    again.finish("FINISHED")

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "10" and run.data.params["new.key"] == "1"
    assert run.data.tags["changed_on_resume.train.steps"] == "20"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 4]
    assert [a.path for a in client.list_artifacts(run_id, "reconstructions")] == ["reconstructions/grid.png"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_unreachable_tracking_server_fails_at_start(tmp_path):
    from echocare_dist.tracking import Tracker, TrackingError
    t = Tracker(True, "http://127.0.0.1:9", "exp", "", tmp_path)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(TrackingError, match="127.0.0.1:9"):
            t.start()
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_reconstruction_grid_layout():
    from PIL import Image

    from echocare_dist.train.images import reconstruction_grid, title_band_height
    B, H, p = 3, 16, 4
    target = torch.rand(B, 1, H, H)
    mask = torch.zeros(B, H // p, H // p, dtype=torch.uint8)
    mask[:, 0, 0] = 1
    recon = torch.full_like(target, 0.25)
    png = reconstruction_grid((target - 0.5) / 0.5, mask, recon, target, 0.5, 0.5, rows=2)
    img = np.asarray(Image.open(io.BytesIO(png)))
    band = title_band_height(H)  # column titles above the tiles
    assert img.shape == (band + 2 * H + 2, 4 * H + 3 * 2)
    img = img[band:]
    col = lambda c: img[:H, c * (H + 2):c * (H + 2) + H]  # noqa: E731
    expected_target = (target[0, 0] * 255).round().numpy()
    assert np.abs(col(0).astype(float) - expected_target).max() <= 1       # input, de-normalized
    assert (col(1)[:p, :p] == 128).all()                                    # masked token drawn gray
    assert np.abs(col(1)[p:, p:].astype(float) - expected_target[p:, p:]).max() <= 1
    assert (col(2) == 64).all()                                             # reconstruction
    assert np.abs(col(3).astype(float) - expected_target).max() <= 1       # target


def test_environment_tools_come_first_on_path(monkeypatch):
    """The venv's ninja must win over the system's for every rank (else DeepSpeed rebuilds its op)."""
    import os
    import sys

    from echocare_dist.train.distributed import prefer_environment_tools
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bindir, "/bin"]))
    prefer_environment_tools()
    prefer_environment_tools()
    parts = os.environ["PATH"].split(os.pathsep)
    if os.path.exists(os.path.join(bindir, "ninja")):
        assert parts == [bindir, "/usr/bin", "/bin"]
    else:
        assert parts == ["/usr/bin", bindir, "/bin"]
