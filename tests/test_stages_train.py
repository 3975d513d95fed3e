"""The progressive schedule (train.stages) through the real trainer (launch/pretrain.py, tiny preset,
CPU fp32, one process): 32 px at mask ratio 0.25 for two steps, then the preset's 64 px at 0.5.
- the run switches model, loader and FLOPs at the boundary and logs the stage with every record;
- the data position crosses the boundary exactly (no epoch restarted, no sample seen twice);
- runs resumed from a checkpoint inside either stage train bit-exactly the same steps.
Wall time on the loaded 2-core machine: 77 s (three 1-process runs) and 65 s (the 2-rank ZeRO-3 + DALI
run below), plus the shared tiny_shards fixture."""
from __future__ import annotations

import pytest
import train_launch as tl

from echocare_dist.config import load_config
from echocare_dist.models import flops_per_image
from echocare_dist.train.sample_log import ENV_VAR, read_sample_logs

pytestmark = pytest.mark.slow

# window 2: every Swin stage grid is whole windows at 32 px and at 64 px (patch 2: 16..2 and 32..4).
STAGES = ["model.window_size=2", "model.drop_path_rate=0.0",
          "train.stages=[{until_step: 2, img_size: 32, mask_ratio: 0.25}, {until_step: null}]"]


def _run(tmp_path, tiny_shards, name, steps, resume="none", extra_env=None):
    run_dir, log = tmp_path / name, tmp_path / f"{name}.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=steps, train__resume=resume,
                                  train__ckpt_every=1, train__keep_last=5)
    rc = tl.run("python", overrides + STAGES, log, nproc=1, timeout=600, extra_env=extra_env)
    assert rc == 0, tl.tail(log)
    return run_dir, log


def test_stages_switch_at_the_boundary_and_resume_inside_a_stage_bit_exactly(tmp_path, tiny_shards, ontology):
    samples = tmp_path / "samples"
    whole, log = _run(tmp_path, tiny_shards, "whole", 4, extra_env={ENV_VAR: str(samples)})
    rows = tl.metrics(whole)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [(m["stage"], m["img_size"]) for m in rows] == [(0, 32), (0, 32), (1, 64), (1, 64)]
    cfg = load_config("tiny_cpu", ["model.window_size=2"])
    num_classes = len(ontology)
    small = flops_per_image(load_config("tiny_cpu", ["model.window_size=2", "model.img_size=32"]).model,
                            num_classes)["train"]
    large = flops_per_image(cfg.model, num_classes)["train"]
    for m in rows:  # MFU follows the stage: the record's TFLOP/s are the stage's FLOPs x its images/s
        expected = (small if m["stage"] == 0 else large) * m["images_per_s"] / 1e12
        assert m["tflops_per_device"] == pytest.approx(expected, rel=1e-9)
    assert "stage 1 of 2 from step 3 to the end: img_size 64" in log.read_text()
    # One epoch is 96+ samples / 4 per step: the 16 samples of 4 steps are all different and all in
    # epoch 0, so the rebuilt loader neither restarted the epoch nor skipped ahead.
    logged = [row for rows_ in read_sample_logs(samples).values() for row in rows_]
    assert len(logged) == 16 and {epoch for epoch, _ in logged} == {0}
    assert len({key for _, key in logged}) == 16

    # Resumed in runs of their own from a checkpoint inside each stage: step 3 (the base size again)
    # and step 1 (32 px: the restored loader is rebuilt, and the boundary is crossed after the resume).
    for step in (3, 1):
        checkpoint = whole / "checkpoints" / f"step_{step:08d}"
        assert checkpoint.is_dir()
        resumed, log = _run(tmp_path, tiny_shards, f"from{step}", 4, resume=str(checkpoint))
        again = tl.metrics(resumed)
        assert [m["step"] for m in again] == list(range(step + 1, 5)), tl.tail(log)
        for key in ("loss", "loss_mim", "loss_hie", "stage", "img_size", "epoch"):
            assert [m[key] for m in again] == [m[key] for m in rows[step:]], key   # bitwise: floats with ==


def test_stages_on_two_ranks_under_zero3_with_the_dali_reader(tmp_path, tiny_shards):
    """Partitioned parameters (ZeRO-3) through the size switch, and the DALI reader's checkpoint
    restored into a pipeline of the other size: no epoch restarted, no sample twice."""
    samples, run_dir, log = tmp_path / "samples", tmp_path / "zero3", tmp_path / "zero3.log"
    overrides = tl.base_overrides(run_dir, tiny_shards, train__steps=4, train__resume="none",
                                  train__ckpt_every=4)
    rc = tl.run("deepspeed", overrides + STAGES + ["train.zero_stage=3", "data.loader=dali"], log, nproc=2,
                timeout=600, extra_env={ENV_VAR: str(samples)})
    assert rc == 0, tl.tail(log)
    rows = tl.metrics(run_dir)
    assert [(m["step"], m["stage"], m["img_size"]) for m in rows] == [(1, 0, 32), (2, 0, 32), (3, 1, 64), (4, 1, 64)]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in rows)
    assert "cannot restore the DALI checkpoint" not in log.read_text()
    logged = [row for rows_ in read_sample_logs(samples).values() for row in rows_]
    assert len(logged) == 2 * 4 * 4 and {epoch for epoch, _ in logged} == {0}
    assert len({key for _, key in logged}) == len(logged)
