"""Faults in ranks end the job cleanly (issue 11 items 1-4, issue 12 item 4).

Fast: the fault spec, the run-directory lock (live holder, crashed holder, filesystems without
flock), config rejection of non-finite / out-of-range numbers, the step-control vote, the
non-finite skip of a plain optimizer and the NaN poisoning of the loss.
Slow (`fault`): 2 ranks under `echocare pretrain --nproc 2` (tiny preset, PIL loader with a worker
process per rank): a rank raising at step 3, SIGTERM / SIGUSR1 / SIGKILL to the launcher, a second
run on the same run_dir, NaN losses (one skipped step; a persistent NaN -> exit 3), a stuck loader
worker that ignores SIGTERM, and SIGTERM while MLflow's server never answers.
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
import threading
import time

import psutil
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


# ------------------------------------------------------------------ fast
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


# ------------------------------------------------------------------ slow: real ranks
def _overrides(run_dir, shards, **extra):
    values = dict(data__loader="pil", train__steps=200, train__ckpt_every=1000, train__zero_stage=2)
    values.update(extra)
    return tl.base_overrides(run_dir, shards, **values)


def _tree(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _assert_all_gone(procs, timeout=20.0):
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"left running: {[(p.pid, p.cmdline()[:4]) for p in alive]}"


@pytest.mark.slow
@pytest.mark.fault
def test_a_rank_that_raises_ends_both_ranks_promptly(tmp_path, tiny_shards):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc = tl.start("echocare", _overrides(run_dir, tiny_shards), log,
                    extra_env={"ECHOCARE_FAULT": "raise@step:3:rank:1"})
    seen: dict[int, psutil.Process] = {}

    def collect():  # every process of the job, workers included, however briefly it lived
        while proc.poll() is None:
            try:
                seen.update({p.pid: p for p in _tree(proc)})
            except psutil.Error:
                pass
            time.sleep(0.05)
    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        tl.wait_for_step(run_dir, 2, proc, log)
        t0 = time.monotonic()
        rc = proc.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    collector.join()
    tree = list(seen.values())
    assert len(tree) >= 4, tree  # 2 ranks + their loader workers
    text = log.read_text()
    assert rc != 0 and elapsed < 60, (rc, elapsed, tl.tail(log))
    assert "InjectedFault: injected fault (ECHOCARE_FAULT): rank 1 raises at step 3" in text
    assert "rank 0 stopping: rank 1 (pid" in text, tl.tail(log)  # the peer names the failing rank's error
    _assert_all_gone(tree, timeout=5)
    assert not (run_dir / "checkpoints" / "latest").exists()  # a failure never writes a checkpoint


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_launcher_forwards_preemption_signals(tmp_path, tiny_shards, sig):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc = tl.start("echocare", _overrides(run_dir, tiny_shards), log)
    try:
        tl.wait_for_step(run_dir, 2, proc, log)
        tree = _tree(proc)
        os.kill(proc.pid, sig)  # the launcher only, as Slurm or a terminal would
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 124, tl.tail(log)
    assert "Traceback" not in text, tl.tail(log)
    step = int(tl.latest(run_dir).split("_")[1])
    assert 2 <= step < 200 and max(tl.losses(run_dir)) == step
    assert step % 10 == 0  # acted on at a vote step: train.preempt_check_every (default 10)
    assert f"preempted ({sig.name})" in text
    _assert_all_gone(tree, timeout=5)


@pytest.mark.slow
@pytest.mark.fault
def test_sigkill_of_the_launcher_leaves_no_rank_and_the_lock_refuses_a_second_run(tmp_path, tiny_shards):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    overrides = _overrides(run_dir, tiny_shards)
    proc = tl.start("echocare", overrides, log)
    try:
        tl.wait_for_step(run_dir, 2, proc, log)
        second = subprocess.run(tl.command("echocare", overrides, nproc=1), cwd=tl.REPO, env=tl.env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {proc.pid} on host {socket.gethostname()}" in second.stderr
        assert max(tl.losses(run_dir)) >= 2  # the first run is untouched and still training
        tree = _tree(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_all_gone(tree, timeout=20)  # parent-death signal: the ranks, then their workers
    assert runlock.probe(run_dir) is None  # a crashed holder's lock is stale


@pytest.mark.slow
@pytest.mark.fault
def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path, tiny_shards):
    """ZeRO-0 fp32: our guard on the plain optimizer (DeepSpeed checks nothing there)."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    rc = tl.run("echocare", _overrides(run_dir, tiny_shards, train__steps=5, train__zero_stage=0), log,
                extra_env={"ECHOCARE_FAULT": "nan@step:3:rank:1"})
    assert rc == 0, tl.tail(log)
    records = {m["step"]: m for m in tl.metrics(run_dir)}
    assert math.isnan(records[3]["loss"]) and all(math.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5))
    assert records[5]["bad_steps"] == 1
    assert records[4]["lr"] == records[3]["lr"]  # the skipped step did not advance the schedule
    assert "step 3 skipped: non-finite" in log.read_text()
    assert tl.latest(run_dir) == "step_00000005"


@pytest.mark.slow
@pytest.mark.fault
def test_persistent_nan_stops_with_exit_3_and_latest_stays_finite(tmp_path, tiny_shards):
    """ZeRO-2: DeepSpeed's own overflow skip; the counting and the stop are ours."""
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    rc = tl.run("echocare", _overrides(run_dir, tiny_shards, train__ckpt_every=1, train__max_bad_steps=3), log,
                extra_env={"ECHOCARE_FAULT": "nan@step:3+:rank:0"})
    assert rc == 3, tl.tail(log)
    assert "3 consecutive non-finite steps" in log.read_text() and "Traceback" not in log.read_text()
    assert tl.latest(run_dir) == "step_00000002"
    assert not list((run_dir / "checkpoints").glob("step_0000000[3-9]"))


@pytest.mark.slow
@pytest.mark.fault
def test_loader_stop_kills_a_worker_that_ignores_sigterm():
    from echocare_dist.data.pil_loader import PilReader
    code = r"""
import signal, time, torch, sys
from torch.utils.data import DataLoader, IterableDataset
class Stuck(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)
        time.sleep(3600)
def ignore(_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
it = iter(DataLoader(Stuck(), batch_size=None, num_workers=1, worker_init_fn=ignore))
next(it)
from echocare_dist.data.pil_loader import PilReader
r = PilReader.__new__(PilReader)
r._it = it
t0 = time.monotonic()
r.stop()
print(f"stopped {time.monotonic() - t0:.1f}", flush=True)
raise RuntimeError("a failing rank")  # Python's exit handler must not wait on the worker now
"""
    assert PilReader.stop.__doc__ and "SIGKILL" in PilReader.stop.__doc__
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=tl.REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "stopped" in out.stdout, out.stderr[-2000:]
    assert time.monotonic() - t0 < 45


@pytest.mark.slow
@pytest.mark.fault
def test_sigterm_while_mlflow_never_answers_ends_promptly(tmp_path, tiny_shards):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered
    threading.Thread(target=accept, daemon=True).start()
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    proc = tl.start("python", _overrides(run_dir, tiny_shards, tracking__enabled="true", tracking__uri=uri), log,
                    nproc=1)
    try:
        deadline = time.time() + 300
        while len(accepted) < 2 and time.time() < deadline and proc.poll() is None:  # pre-flight probe, MLflow
            time.sleep(0.2)
        assert len(accepted) >= 2, tl.tail(log)
        # Rank 0 of a run without our launcher holds the run directory itself.
        assert f"pid {proc.pid} on host" in (runlock.probe(run_dir) or "")
        time.sleep(1)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.close()
        for conn in accepted:
            conn.close()
    assert rc == 124 and elapsed < 20, (rc, elapsed, tl.tail(log))
    assert "preempted (SIGTERM" in log.read_text() and "Traceback" not in log.read_text()


@pytest.mark.slow
@pytest.mark.fault
def test_watchdog_ends_a_rank_blocked_after_a_peer_failed(tmp_path):
    """The NCCL case: a collective with a dead peer never returns; the watchdog ends the rank and
    its workers (which ignore SIGTERM) on the peer's report."""
    code = r"""
import logging, multiprocessing, signal, sys, time
from pathlib import Path
from echocare_dist.train.faults import FailureBoard, PeerWatchdog
def worker():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
if __name__ == "__main__":
    logging.basicConfig()
    child = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
    child.start()
    board = FailureBoard(Path(sys.argv[1]), "attempt", rank=0)
    board.prepare(is_main=True)
    seen = []
    PeerWatchdog(board, seen.append, poll_s=0.2, grace_s=1.0).start()
    print(child.pid, flush=True)
    time.sleep(600)  # "blocked in a collective"
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=tl.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        time.sleep(1.0)
        assert proc.poll() is None  # no report yet: nothing happens
        from echocare_dist.train.faults import FailureBoard
        FailureBoard(tmp_path, "attempt", rank=1).report(OSError(28, "No space left on device"))
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1 and elapsed < 10, (rc, elapsed, err)
    assert "rank 1" in err and "No space left on device" in err and "still blocked" in err
    _assert_all_gone([child], timeout=5)
