"""Pretraining on 2 CPU ranks under the DeepSpeed launcher and torchrun (tiny preset, fp32, deterministic).

Coverage: ZeRO-1 under torchrun (reference run: the loss falls) and under deepspeed (killed with
SIGKILL, resumed: identical loss trajectory); ZeRO-2 under deepspeed (SIGTERM to one rank ->
complete checkpoint, exit 124, `latest` on it; resumed on ONE rank through the universal
checkpoint, same MLflow run); ZeRO-3 with gradient accumulation through `echocare pretrain
--nproc 2` (our local launcher, train/launcher.py).
"""
from __future__ import annotations

import json
import os
import signal

import pytest

import train_launch as tl

pytestmark = pytest.mark.slow

STEPS = 10
CKPT_EVERY = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """The uninterrupted ZeRO-1 trajectory, under torchrun."""
    run_dir = tmp_path_factory.mktemp("reference")
    log = run_dir / "launch.log"
    rc = tl.run("torchrun", tl.base_overrides(run_dir, tiny_shards, train__steps=STEPS, train__zero_stage=1,
                                              train__ckpt_every=CKPT_EVERY), log)
    assert rc == 0, tl.tail(log)
    return run_dir


def test_zero1_torchrun_trains_and_the_loss_falls(reference):
    losses = tl.losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert sum(last) / 3 < 0.9 * sum(first) / 3, losses
    record = tl.metrics(reference)[-1]
    for key in ("loss_mim", "loss_hie", "lr", "images_per_s", "step_time_s", "data_wait_s", "mem_gb", "mfu",
                "loader_bad_samples", "loader_quarantined"):
        assert key in record and record[key] is not None, key
    assert record["images_per_s"] > 0 and 0 < record["mfu"] and record["mem_gb"] > 0
    assert tl.latest(reference) == f"step_{STEPS:08d}"
    ds_config = json.loads((reference / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["train_batch_size"] == 2 * 4
    assert (reference / "config.resolved.yaml").exists()


def test_zero1_deepspeed_kill_and_resume_reproduces_the_trajectory(reference, tmp_path, tiny_shards):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=STEPS, train__zero_stage=1,
                                  train__ckpt_every=CKPT_EVERY)
    proc = tl.start("deepspeed", overrides, log)
    try:
        tl.wait_for_step(run_dir, CKPT_EVERY + 2, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no warning, no checkpoint: like a node failure
        proc.wait()
    assert tl.latest(run_dir) == f"step_{CKPT_EVERY:08d}"
    rc = tl.run("deepspeed", overrides, log)  # train.resume=auto
    assert rc == 0, tl.tail(log)
    assert "resumed from" in log.read_text()
    assert tl.losses(run_dir) == tl.losses(reference)  # bit-exact, every step


def test_zero2_deepspeed_sigterm_checkpoints_and_resumes_on_one_rank(tmp_path, tiny_shards):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=100, train__zero_stage=2,
                                  train__ckpt_every=1000, tracking__enabled="true")
    proc = tl.start("deepspeed", overrides, log)
    try:
        tl.wait_for_step(run_dir, 3, proc, log)
        pids = tl.rank_pids(proc)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGTERM)  # one rank only: the ranks must agree among themselves
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 124, tl.tail(log)  # train.requeue_exit_code, passed through by the deepspeed launcher
    tag = tl.latest(run_dir)
    step = int(tag.split("_")[1])
    assert 3 <= step < 100 and max(tl.losses(run_dir)) == step
    saved = run_dir / "checkpoints" / tag
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["step"] == step
    assert sorted(p.name for p in saved.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # Requeued on a smaller allocation: one process, DeepSpeed universal checkpoint.
    resume_log = tmp_path / "resume.log"
    rc = tl.run("python", tl.base_overrides(run_dir, tiny_shards, train__steps=step + 2, train__zero_stage=2,
                                            train__ckpt_every=1000, tracking__enabled="true"), resume_log, nproc=1)
    assert rc == 0, tl.tail(resume_log)
    text = resume_log.read_text()
    assert "universal checkpoint" in text and f"resumed from {saved} at step {step}" in text
    assert (run_dir / "checkpoints" / f"{tag}_universal" / "meta.json").exists()
    assert tl.latest(run_dir) == f"step_{step + 2:08d}"
    assert sorted(tl.losses(run_dir)) == list(range(1, step + 3))
    final = json.loads((run_dir / "checkpoints" / tl.latest(run_dir) / "meta.json").read_text())
    assert final["world_size"] == 1 and final["mlflow_run_id"] == meta["mlflow_run_id"]

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("echocare-pretrain").experiment_id])
    assert [r.info.run_id for r in runs] == [meta["mlflow_run_id"]]  # the same MLflow run continued
    history = client.get_metric_history(meta["mlflow_run_id"], "loss")
    assert {m.step for m in history} >= set(range(1, step + 3))
    assert runs[0].info.status == "FINISHED"


def test_zero3_with_accumulation_via_echocare_pretrain_nproc(tmp_path, tiny_shards):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    rc = tl.run("echocare", tl.base_overrides(run_dir, tiny_shards, train__steps=3, train__zero_stage=3,
                                              train__grad_accum=2, train__ckpt_every=1000), log)
    assert rc == 0, tl.tail(log)
    losses = tl.losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    saved = run_dir / "checkpoints" / tl.latest(run_dir)
    assert saved.name == "step_00000003"
    assert sorted(p.name for p in saved.glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["gradient_accumulation_steps"] == 2 and ds_config["train_batch_size"] == 2 * 4 * 2


def test_dali_cpu_pipeline_feeds_two_rank_training(tmp_path, tiny_shards):
    """The DALI loader (CPU pipeline here; the same definition decodes on the GPU) drives ZeRO-2 on 2 ranks."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    rc = tl.run("torchrun", tl.base_overrides(run_dir, tiny_shards, train__steps=4, train__zero_stage=2,
                                              train__ckpt_every=4, data__loader="dali", data__device="cpu"), log)
    assert rc == 0, tl.tail(log)
    text = log.read_text()
    assert "rank 0/2: DALI (CPU) loader" in text, tl.tail(log)  # rank 0 logs; every rank builds it from one config
    losses = tl.losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 10 for v in losses.values())
    assert tl.latest(run_dir) == "step_00000004"
