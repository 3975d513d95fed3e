"""Rank-fault machinery in one process (issue 11 items 1-4, issue 12 item 4): the fault spec, the
run-directory lock (live holder, crashed holder, filesystems without flock), config rejection of
non-finite / out-of-range numbers, the step-control vote, a signal inside `interruptible`, the
non-finite skip of a plain optimizer and the NaN poisoning of the loss.
The same faults in real ranks: test_faults_ranks.py.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_launch as tl
from echocare_dist import runlock
from echocare_dist.config import ConfigError, load_config
from echocare_dist.preflight import find_problems
from echocare_dist.train import nonfinite
from echocare_dist.train.control import NonFiniteError, StepControl
from echocare_dist.train.faults import Fault, PeerFailed, parse_fault
from echocare_dist.train.preemption import PreemptionHandler

HOLD_LOCK = "import sys, time; from echocare_dist.runlock import RunDirLock; RunDirLock(sys.argv[1]).acquire(); " \
            "print('locked', flush=True); time.sleep(600)"


def test_fault_spec_parsing():
    assert parse_fault("raise@step:3:rank:1") == Fault("raise", 3, 3, 1)
    assert parse_fault("nan@step:3-5") == Fault("nan", 3, 5, None)
    f = parse_fault("nan@step:4+:rank:0")
    assert f == Fault("nan", 4, None, 0)
    assert f.applies("nan", 4, 0) and f.applies("nan", 900, 0)
    assert not f.applies("nan", 3, 0) and not f.applies("nan", 5, 1) and not f.applies("raise", 5, 0)
    assert parse_fault("") is None
    for bad in ("raise@3", "boom@step:1", "nan@step:5-3"):
        with pytest.raises(ValueError, match="ECHOCARE_FAULT"):
            parse_fault(bad)


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=tl.REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_dir_lock_names_the_holder_and_survives_its_crash(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    cfg = load_config("tiny_cpu", [f"train.run_dir={run_dir}"], validate_now=False)
    holder = _holder(run_dir)
    try:
        with pytest.raises(runlock.RunDirLocked) as err:
            runlock.RunDirLock(run_dir).acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(err.value)
        problems = [p for p in find_problems(cfg) if p.key == "train.run_dir"]
        assert len(problems) == 1 and f"pid {holder.pid}" in problems[0].reason
    finally:
        holder.kill()  # a crash: no release, the lock file still names the dead holder
        holder.wait()
    assert json.loads((run_dir / runlock.LOCK_NAME).read_text())["pid"] == holder.pid
    assert runlock.probe(run_dir) is None
    assert not [p for p in find_problems(cfg) if "in use" in p.reason]
    lock = runlock.RunDirLock(run_dir).acquire()
    try:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_run_dir_lock_without_flock_judges_the_recorded_pid(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / runlock.LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    lock = runlock.RunDirLock(run_dir).acquire()  # a dead pid on this host: stale
    assert lock.took_over["pid"] == dead.pid
    lock.release()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "since": 0}))
        with pytest.raises(runlock.RunDirLocked, match=f"pid {alive.pid}"):
            runlock.RunDirLock(run_dir).acquire()
        assert f"pid {alive.pid}" in runlock.probe(run_dir)
    finally:
        alive.kill()
        alive.wait()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(runlock.RunDirLocked, match="delete the lock file"):
        runlock.RunDirLock(run_dir).acquire()


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.eps=-.inf", "optim.eps"), ("optim.betas=[0.9, .nan]", "optim.betas"),
    ("data.augment.norm_std=.nan", "data.augment.norm_std"), ("loss.hie_weight=inf", "loss.hie_weight"),
    ("optim.min_lr=1.0", "optim.min_lr"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("train.max_bad_steps=0", "train.max_bad_steps"), ("train.preempt_check_every=0", "train.preempt_check_every"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s"),
])
def test_config_rejects_non_finite_and_out_of_range_numbers(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", [override])


def test_step_control_vote_cadence_and_flags():
    preempt = PreemptionHandler(())
    control = StepControl(every=4, max_bad_steps=3, preempt=preempt, first_step=2)
    assert [s for s in range(1, 13) if control.due(s)] == [2, 4, 8, 12]
    control.record(5, True, "loss nan")
    assert not control.checkpoint_safe
    control.record(6, False, "")
    assert control.checkpoint_safe and control.bad_total == 1
    assert not control.vote(8).preempt
    preempt.requested_by = "SIGTERM"
    assert not control.vote(9).preempt  # not a vote step: no collective, no decision
    assert control.vote(12).preempt
    control.record(13, True, "x")
    control.record(14, True, "x")
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps .* up to step 15"):
        control.record(15, True, "x")
    control.peer_failure = {"rank": 1, "pid": 7, "host": "h", "error": "OSError: disk full"}
    with pytest.raises(PeerFailed, match="rank 1 .*OSError: disk full"):
        control.vote(16)


def test_a_signal_inside_interruptible_raises_at_once():
    from echocare_dist.train.preemption import Preempted
    handler = PreemptionHandler(["SIGUSR1"])
    try:
        with pytest.raises(Preempted, match="SIGUSR1"):
            with handler.interruptible():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)  # a blocking call (MLflow's retries): interrupted, not waited out
        assert handler.requested_locally
    finally:
        handler.restore()
    outside = PreemptionHandler(["SIGUSR1"])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # outside the block: only recorded
        assert outside.requested_by == "SIGUSR1"
    finally:
        outside.restore()


def test_guard_skips_a_non_finite_update_of_a_plain_optimizer():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    assert nonfinite.install_guard(opt)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and math.isnan(opt._global_grad_norm) and torch.equal(w.detach(), torch.ones(3))
    assert not opt.state  # AdamW never ran: no moments, no step count
    w.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(math.sqrt(2))
    assert w.detach()[0] < 1.0
    assert not nonfinite.install_guard(opt)  # has its own overflow flag now: not wrapped twice


def test_poison_scale_keeps_finite_gradients_bit_identical_and_spreads_nan():
    x = torch.randn(5, requires_grad=True, generator=torch.Generator().manual_seed(0))
    (x ** 2).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    loss = (x ** 2).sum()
    (loss * nonfinite.poison_scale(loss)).backward()
    assert torch.equal(x.grad, plain)
    x.grad = None
    loss = (x ** 2).sum() + float("inf")  # the gradient alone would stay finite
    (loss * nonfinite.poison_scale(loss)).backward()
    assert torch.isnan(x.grad).all()
