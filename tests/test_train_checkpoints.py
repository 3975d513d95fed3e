"""Pretraining state in one process: the checkpoint pointer, pruning, crash safety mid-save and
resume compatibility (ontology, architecture, world size -> universal load), and the preemption
flag. Checkpoints against real damage and exports: test_faults_checkpoint.py."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from echocare_dist.config import load_config
from echocare_dist.train import checkpoint as ckpt
from echocare_dist.train import distributed


# ------------------------------------------------------------------ checkpoints
class FakeEngine:
    """Writes a DeepSpeed-like tag directory; `crash_after_files` simulates a death mid-save."""

    def __init__(self, crash_after_files: int | None = None):
        self.crash_after_files = crash_after_files
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed's own `latest` would race with ours
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        for i in range(2):
            if self.crash_after_files is not None and i >= self.crash_after_files:
                raise KeyboardInterrupt("killed mid-save")
            torch.save(dict(client_state, shard=i), os.path.join(d, f"shard_{i}.pt"))

    def load_checkpoint(self, load_dir, tag, **kw):
        path = os.path.join(load_dir, tag)
        self.loaded = path
        return path, torch.load(os.path.join(path, "shard_0.pt"), weights_only=True)


SINGLE = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launcher="single")


def _meta(cfg, onto_hash="h0", world_size=1, zero_stage=2):
    return dict(world_size=world_size, zero_stage=zero_stage, ontology_hash=onto_hash,
                model=ckpt.model_fingerprint(cfg.model))


def test_save_writes_meta_then_pointer_and_prunes(tmp_path, tiny_config):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=2)
    for step in (10, 20, 30):
        mgr.save(FakeEngine(), step, {"step": step}, _meta(tiny_config))
    assert (tmp_path / "latest").read_text().strip() == "step_00000030"
    assert mgr.complete_tags() == ["step_00000020", "step_00000030"]
    assert not (tmp_path / "step_00000010").exists()
    meta = json.loads((tmp_path / "step_00000030" / "meta.json").read_text())
    assert meta["step"] == 30 and meta["tag"] == "step_00000030"


def test_crash_mid_save_leaves_latest_on_previous_checkpoint(tmp_path, tiny_config):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=3)
    mgr.save(FakeEngine(), 10, {"step": 10}, _meta(tiny_config))
    with pytest.raises(KeyboardInterrupt):
        mgr.save(FakeEngine(crash_after_files=1), 20, {"step": 20}, _meta(tiny_config))
    assert (tmp_path / "step_00000020" / "shard_0.pt").exists()       # the partial directory is there...
    assert not (tmp_path / "step_00000020" / "meta.json").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"  # ...but nothing points at it
    plan = mgr.plan_resume("auto", tiny_config, "h0")
    assert plan.tag == "step_00000010" and not plan.universal
    engine = FakeEngine()
    assert mgr.load(engine, plan)["step"] == 10
    # Saving step 20 again replaces the partial directory instead of mixing files into it.
    (tmp_path / "step_00000020" / "stray_from_other_world_size.pt").write_bytes(b"x")
    mgr.save(FakeEngine(), 20, {"step": 20}, _meta(tiny_config))
    assert not (tmp_path / "step_00000020" / "stray_from_other_world_size.pt").exists()
    assert mgr.plan_resume("auto", tiny_config, "h0").tag == "step_00000020"


def test_pointer_to_incomplete_dir_falls_back_to_newest_complete(tmp_path, tiny_config):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=3)
    mgr.save(FakeEngine(), 10, {"step": 10}, _meta(tiny_config))
    (tmp_path / "step_00000020").mkdir()
    (tmp_path / "latest").write_text("step_00000020\n")  # e.g. a pointer copied by hand
    assert mgr.find_auto().name == "step_00000010"


def test_no_checkpoint_and_resume_none(tmp_path, tiny_config):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=3)
    assert mgr.plan_resume("auto", tiny_config, "h0") is None
    mgr.save(FakeEngine(), 10, {"step": 10}, _meta(tiny_config))
    assert mgr.plan_resume("none", tiny_config, "h0") is None
    with pytest.raises(ckpt.ResumeError, match="not a complete checkpoint"):
        mgr.plan_resume(str(tmp_path / "step_00000099"), tiny_config, "h0")
    assert mgr.plan_resume(str(tmp_path / "step_00000010"), tiny_config, "h0").tag == "step_00000010"


def test_resume_refuses_other_ontology_or_architecture(tmp_path, tiny_config):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=3)
    mgr.save(FakeEngine(), 10, {"step": 10}, _meta(tiny_config, onto_hash="aaaa"))
    with pytest.raises(ckpt.ResumeError, match="ontology hash 'aaaa'.*'bbbb'"):
        mgr.plan_resume("auto", tiny_config, "bbbb")
    other = load_config("tiny_cpu", ["model.decoder_dim=48"])
    with pytest.raises(ckpt.ResumeError, match="model.decoder_dim: checkpoint 32 vs config 48"):
        mgr.plan_resume("auto", other, "aaaa")
    # Training-only knobs may change between restarts.
    fine = load_config("tiny_cpu", ["model.drop_path_rate=0.0", "model.grad_checkpointing=true"])
    assert mgr.plan_resume("auto", fine, "aaaa") is not None


def test_world_size_change_plans_a_universal_load(tmp_path, tiny_config, monkeypatch):
    mgr = ckpt.CheckpointManager(tmp_path, SINGLE, keep_last=3)
    mgr.save(FakeEngine(), 10, {"step": 10}, _meta(tiny_config, world_size=2, zero_stage=2))
    converted = []

    def fake_convert(source, target, meta):
        converted.append((source.name, target.name))
        target.mkdir()
        (target / "meta.json").write_text(json.dumps(meta))

    monkeypatch.setattr(mgr, "_convert_to_universal", fake_convert)
    plan = mgr.plan_resume("auto", tiny_config, "h0")
    assert plan.universal and plan.tag == "step_00000010_universal" and plan.load_dir == tmp_path
    assert converted == [("step_00000010", "step_00000010_universal")]
    mgr.plan_resume("auto", tiny_config, "h0")
    assert len(converted) == 1  # a finished conversion is reused
    # ZeRO-0 checkpoints hold whole optimizer states: any world size loads them directly.
    mgr.save(FakeEngine(), 20, {"step": 20}, _meta(tiny_config, world_size=2, zero_stage=0))
    assert not mgr.plan_resume("auto", tiny_config, "h0").universal


# ------------------------------------------------------------------ preemption
def test_signal_sets_flag_and_handlers_are_restored():
    from echocare_dist.train.preemption import PreemptionHandler
    before = signal.getsignal(signal.SIGUSR1)
    from echocare_dist.train.control import StepControl
    from echocare_dist.train.preemption import Preempted
    handler = PreemptionHandler(["SIGUSR1"])
    control = StepControl(every=1, max_bad_steps=5, preempt=handler, first_step=1)
    try:
        assert not control.vote(1).preempt
        os.kill(os.getpid(), signal.SIGUSR1)
        assert control.vote(2).preempt and handler.requested_by == "SIGUSR1"
        with pytest.raises(Preempted):  # inside interruptible(): a recorded signal stops at once
            with handler.interruptible():
                pass
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) is before
