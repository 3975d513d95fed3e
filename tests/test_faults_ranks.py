"""Faults in ranks end the job cleanly (issue 11 items 1-4, issue 12 item 4).

The machinery in one process (fault spec, run-dir lock, step-control vote, non-finite guard):
test_faults_units.py.
Slow (`fault`): 2 ranks under `echocare pretrain --nproc 2` (tiny preset, PIL loader with a worker
process per rank): a rank raising at step 3, SIGTERM / SIGUSR1 / SIGKILL to the launcher, a second
run on the same run_dir, NaN losses (one skipped step; a persistent NaN -> exit 3), a stuck loader
worker that ignores SIGTERM, and SIGTERM while MLflow's server never answers.
"""
from __future__ import annotations

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

import train_launch as tl
from echocare_dist import runlock


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
