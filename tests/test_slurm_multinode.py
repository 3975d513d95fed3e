"""slurm/pretrain.sh across hosts: a real Slurm of two nodes on this machine
(slurm/local/start-multinode.sh: each slurmd in its own network, UTS and mount namespace, with its
own hostname and address on a bridge; the host's filesystem is the shared one).

- two nodes, one rank each, over gloo: ranks on different hosts, every sample of an epoch seen
  exactly once across the nodes, the loss falls, complete checkpoints; USR1 -> checkpoint written
  by both ranks -> exit 124 -> requeue -> resume to the final step; then the same run on ONE node;
- a killed node (kill -9 of every rank on one host): the job fails with a clear message well
  inside train.dist_timeout_s, a resubmission resumes on the remaining node;
- bad input stopped by the pre-flight before any process group, naming host and setting, with no
  checkpoint touched: an unresolvable rendezvous host, MASTER_PORT in use, mismatched world
  sizes, a run directory that one host cannot write (a read-only bind mount in that node's own
  mount namespace).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_helpers import Cluster, free_port_pair, job_env, latest, step_of, tail

from echocare_dist.shardfmt.index import read_index
from echocare_dist.shardfmt.manifest import Manifest
from echocare_dist.train.sample_log import ENV_VAR as SAMPLE_LOG_ENV, read_sample_logs

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "pretrain.sh"
LOCAL = REPO / "slurm" / "local"

CPU_TASK = ["--gpus-per-node=0", "--cpus-per-task=1"]
TINY = ["--config", "tiny_cpu", "--set", "tracking.enabled=false", "--set", "train.log_every=2",
        "--set", "train.image_every=1000"]
MICRO_BATCH = 8  # tiny_cpu's train.micro_batch


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local multi-node Slurm needs root (network namespaces, slurmd, munged)")
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is missing (iproute2 / util-linux)")
    state = Path(tempfile.mkdtemp(prefix="echocare-slurm-multi-"))
    env = job_env()
    env["ECHOCARE_SLURM_PORT"] = str(free_port_pair())
    try:
        start = subprocess.run(["bash", str(LOCAL / "start-multinode.sh"), str(state), "2"], env=env,
                               capture_output=True, text=True, timeout=900)
        if start.returncode == 3:
            pytest.skip(f"slurm-wlm/munge cannot be installed here: {start.stderr.strip()[-500:]}")
        assert start.returncode == 0, f"start-multinode.sh failed:\n{start.stdout}{start.stderr}"
        env["SLURM_CONF"] = str(state / "slurm.conf")
        yield Cluster(state, env)
    finally:
        stop = subprocess.run(["bash", str(LOCAL / "stop-multinode.sh"), str(state)], env=env,
                              capture_output=True, text=True, timeout=180)
        left = sorted(p.name for p in (state / "run").glob("*.pid"))
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"stop-multinode.sh left {left} running: {stop.stderr}"
        assert f"echocare-{env['ECHOCARE_SLURM_PORT']}-" not in namespaces, namespaces


def _netns(cluster: Cluster, node: int) -> str:
    return f"echocare-{cluster.env['ECHOCARE_SLURM_PORT']}-node{node}"


def _slurmd_pid(cluster: Cluster, node: int) -> int:
    return int((cluster.state / "run" / f"slurmd-node{node}.pid").read_text().strip())


def _submit(cluster: Cluster, log: Path, nodes: int, per_node: int, *args: str, wait: bool = False,
            timeout: float = 60, extra_env: dict | None = None, where: str = "") -> tuple[str, int]:
    """Submit; with `wait`, return when the job ended with its exit code (polled every second:
    `sbatch --wait` polls at growing intervals and returns up to ~30 s late)."""
    cmd = ["sbatch", "--parsable", f"--output={log}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", *CPU_TASK]
    if where:
        cmd.append(f"--nodelist={where}")
    saved = dict(cluster.env)
    cluster.env.update(extra_env or {})
    try:
        result = cluster.run(*cmd, str(SCRIPT), *args, timeout=timeout, check=False)
    finally:
        cluster.env.clear()
        cluster.env.update(saved)
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch: {result.stdout}{result.stderr}\n{tail(log)}"
    if not wait:
        return job_id, result.returncode
    info = cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                            "the end of the job", timeout, log)
    code, sig = (int(x) for x in info["ExitCode"].split(":"))
    return job_id, code or (128 + sig if sig else 0)


def _wait_for_checkpoint(cluster: Cluster, job_id: str, run_dir: Path, log: Path, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while not latest(run_dir):
        info = cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info['JobState']} before any checkpoint\n{tail(log)}"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout:.0f} s\n{tail(log)}"
        time.sleep(0.5)
    return step_of(latest(run_dir))


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([0-9.]+)", out)]


def _complete(run_dir: Path, step: int) -> dict:
    meta = run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json"
    assert meta.is_file(), f"{meta.parent} has no completion marker"
    return json.loads(meta.read_text())


def _shard_keys(shards: Path) -> set[str]:
    """Every sample key of the shard set, from the manifest's shards and their DALI indexes."""
    keys = set()
    for entry in Manifest.read(shards).shards:
        keys.update(s.key for s in read_index((shards / entry.name).with_suffix(".idx")))
    return keys


def _keys_by_epoch(sample_dir: Path, files: list[str] | None = None) -> dict[int, list[str]]:
    """{epoch: keys consumed by every rank, repeats kept}: the sample logs ($ECHOCARE_SAMPLE_LOG)."""
    out: dict[int, list[str]] = {}
    for name, rows in read_sample_logs(sample_dir).items():
        if files is None or name in files:
            for epoch, key in rows:
                out.setdefault(epoch, []).append(key)
    return out


def _assert_epochs_exactly_once(by_epoch: dict[int, list[str]], epochs: range, all_keys: set[str], world: int):
    for epoch in epochs:
        keys = by_epoch.get(epoch, [])
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        assert not repeated, f"epoch {epoch}: samples seen more than once: {repeated[:5]}"
        # Each rank takes its share's whole micro-batches; the remainder (< world x micro-batch) waits.
        steps = len(all_keys) // world // MICRO_BATCH
        assert len(keys) == world * steps * MICRO_BATCH, (epoch, len(keys))
        assert set(keys) <= all_keys, f"epoch {epoch}: keys that are not in the shards"


# ------------------------------------------------------------------------------ two nodes, preemption
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_train_preempt_requeue_and_resume_then_continue_on_one_node(cluster, tiny_shards, tmp_path):
    run_dir, log, samples = tmp_path / "run", tmp_path / "job.out", tmp_path / "samples"
    all_keys = _shard_keys(tiny_shards)
    steps_per_epoch = len(all_keys) // 2 // MICRO_BATCH
    # The run stops half-way through epoch 4: the one-node continuation has to split its rest.
    steps = 4 * steps_per_epoch + steps_per_epoch // 2
    run = [*TINY, "--set", f"data.shards={tiny_shards}", "--set", f"train.run_dir={run_dir}",
           "--set", f"train.ckpt_every={steps_per_epoch}", "--set", "train.preempt_check_every=2"]
    job_id, _ = _submit(cluster, log, 2, 1, *run, "--set", f"train.steps={steps}",
                        extra_env={SAMPLE_LOG_ENV: str(samples)})
    try:
        # The first checkpoint closes epoch 0; then the signal `--signal=B:USR1@N` would send.
        first = _wait_for_checkpoint(cluster, job_id, run_dir, log)
        assert first < steps, f"the run finished before it could be preempted (first checkpoint {first})"
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        cluster.wait_for(job_id, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1", "requeue", 240, log)
        preempted_at = step_of(latest(run_dir))
        assert first <= preempted_at < steps, (first, preempted_at)
        ckpt = run_dir / "checkpoints" / latest(run_dir)
        # ZeRO-2: each rank wrote its own optimizer partition, from its own host, into the shared directory.
        for rank in (0, 1):
            assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), sorted(os.listdir(ckpt))
        assert _complete(run_dir, preempted_at)["world_size"] == 2
        first_attempt = sorted(read_sample_logs(samples))
        time.sleep(2)  # a launch in the second of the requeue is refused (credential revoked): test_slurm.py
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        info = cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                                "the end of the resumed run", 420, log)
    finally:
        cluster.run("scancel", job_id, check=False)
    out = tail(log, 800)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        f"{info}\n{out}\n{cluster.logs()}"
    # One rank per host, each on its own hostname; one rendezvous across them.
    assert re.search(r"^0: task rank 0/2 local 0/1 node 0 \(node1\)$", out, re.M), out
    assert re.search(r"^1: task rank 1/2 local 0/1 node 1 \(node2\)$", out, re.M), out
    assert {name.split(".")[1] for name in first_attempt} == {"node1", "node2"}, first_attempt
    first_run, _, second_run = out.partition(f"job {job_id} restart 1 ")
    assert re.search(rf"preempted \(SIGUSR1\): checkpoint at step {preempted_at} complete; exiting with 124",
                     first_run), first_run
    assert f"requeueing job {job_id}" in first_run
    assert re.search(rf"resumed from \S+ at step {preempted_at}\b", second_run), second_run
    assert f"training complete at step {steps}" in second_run
    losses = _losses(out)
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    assert latest(run_dir) == f"step_{steps:08d}" and _complete(run_dir, steps)["world_size"] == 2
    # Every sample of an epoch exactly once across the two nodes: epoch 0 in the first attempt,
    # and every epoch of the run across the requeue (same world size: the exact position resumes).
    _assert_epochs_exactly_once(_keys_by_epoch(samples, first_attempt), range(1), all_keys, world=2)
    _assert_epochs_exactly_once(_keys_by_epoch(samples), range(4), all_keys, world=2)

    # The same run on ONE node, one rank: the weights through DeepSpeed's universal checkpoint, the
    # data position re-split (data/resume.py): the rest of epoch 4, no sample of it twice.
    log1, samples1 = tmp_path / "one-node.out", tmp_path / "samples-one-node"
    more = 5 * steps_per_epoch
    job1, code = _submit(cluster, log1, 1, 1, *run, "--set", f"train.steps={more}", wait=True, timeout=480,
                         extra_env={SAMPLE_LOG_ENV: str(samples1)})
    out1 = tail(log1, 400)
    assert code == 0, f"{out1}\n{cluster.logs()}"
    assert re.search(r"^0: task rank 0/1 local 0/1 node 0 \(node\d\)$", out1, re.M), out1
    assert re.search(rf"resumed from \S+ at step {steps}\b", out1), out1
    assert f"training complete at step {more}" in out1
    assert latest(run_dir) == f"step_{more:08d}" and _complete(run_dir, more)["world_size"] == 1
    epoch4 = _keys_by_epoch(samples).get(4, []) + _keys_by_epoch(samples1).get(4, [])
    assert set(_keys_by_epoch(samples1)) == {4}, "the one-node run finishes epoch 4 and nothing else"
    _assert_epochs_exactly_once({4: epoch4}, range(4, 5), all_keys, world=2)


# ------------------------------------------------------------------------------ a node lost
def _rank_processes(cluster: Cluster, node: int) -> list[int]:
    """The training processes (ranks and their loader workers) running on one node."""
    listed = subprocess.run(["ip", "netns", "pids", _netns(cluster, node)], capture_output=True, text=True).stdout
    pids = []
    for pid in listed.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # already gone
        if any(b"pretrain.py" in a or b"multiprocessing" in a for a in argv) and b"python" in argv[0]:
            pids.append(int(pid))
    return pids


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(900)
def test_killed_node_fails_the_job_clearly_and_a_resubmission_resumes_on_the_other(cluster, tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    dist_timeout = 120
    run = [*TINY, "--set", f"data.shards={tiny_shards}", "--set", f"train.run_dir={run_dir}",
           "--set", "train.ckpt_every=3", "--set", f"train.dist_timeout_s={dist_timeout}"]
    # srun's own clean-up after a task's exit comes later than train.dist_timeout_s: what ends the
    # job in time is the trainer noticing the lost peer, not srun.
    job_id, _ = _submit(cluster, log, 2, 1, *run, "--set", "train.steps=400",
                        extra_env={"ECHOCARE_TASK_EXIT_WAIT": str(3 * dist_timeout)})
    try:
        _wait_for_checkpoint(cluster, job_id, run_dir, log)
        victims = _rank_processes(cluster, 2)
        assert victims, f"no training process found on node2\n{tail(log)}"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        info = cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                                "the end of the job after the node loss", dist_timeout + 60, log)
        took = time.monotonic() - killed_at
    finally:
        cluster.run("scancel", job_id, check=False)
    out = tail(log, 400)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{out}"
    assert took < dist_timeout, f"the job took {took:.0f} s to end after the node loss (train.dist_timeout_s={dist_timeout})"
    assert "error: training failed with exit code" in out and "resubmit the same command to resume" in out, out
    assert re.search(r"task 1.*(Killed|signal 9)", out, re.I), out
    assert not _rank_processes(cluster, 1), "a rank of the failed job is still running on node1"
    last = step_of(latest(run_dir))
    _complete(run_dir, last)

    # The resubmission, on the node that is left: both ranks on node1, from the last complete checkpoint.
    log2 = tmp_path / "resubmitted.out"
    job2, code = _submit(cluster, log2, 1, 2, *run, "--set", f"train.steps={last + 3}", where="node1",
                         wait=True, timeout=480)
    out2 = tail(log2, 400)
    assert code == 0, f"{out2}\n{cluster.logs()}"
    assert re.search(r"^1: task rank 1/2 local 1/2 node 0 \(node1\)$", out2, re.M), out2
    assert re.search(rf"resumed from \S+ at step {last}\b", out2), out2
    assert f"training complete at step {last + 3}" in out2
    assert latest(run_dir) == f"step_{last + 3:08d}"


# ------------------------------------------------------------------------------ bad input, per host
# What one rank is given differently, put before its command through ECHOCARE_TASK_PREFIX.
TASK_WRAPPER = '#!/bin/sh\n{body}\nexec "$@"\n'
FAULTS = {
    "unresolvable_rendezvous_host": 'export MASTER_ADDR=node9',
    "mismatched_world_sizes": '[ "$SLURM_PROCID" = 1 ] && export WORLD_SIZE=3',
    "master_port_in_use": '',
    "run_dir_read_only_on_one_host": '',
}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_input_on_one_host_stops_every_rank_in_the_preflight(cluster, tiny_shards, tmp_path, fault):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # A run with a checkpoint already: the failed start must not touch it.
    step_dir = run_dir / "checkpoints" / "step_00000003"
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    before = _snapshot(run_dir)
    wrapper = tmp_path / "task-wrapper.sh"
    wrapper.write_text(TASK_WRAPPER.format(body=FAULTS[fault]))
    wrapper.chmod(0o755)
    extra = {"ECHOCARE_TASK_PREFIX": str(wrapper), "ECHOCARE_TASK_EXIT_WAIT": "10"}
    blocker, slurmd = None, _slurmd_pid(cluster, 2)
    try:
        if fault == "master_port_in_use":
            port = free_port_pair()
            code = ("import socket, time; s = socket.socket(); s.bind(('0.0.0.0', %d)); s.listen(); "
                    "print('listening', flush=True); time.sleep(300)" % port)
            blocker = subprocess.Popen(["nsenter", f"--net=/run/netns/{_netns(cluster, 1)}", sys.executable, "-c", code],
                                       stdout=subprocess.PIPE, text=True)
            assert blocker.stdout.readline().strip() == "listening"
            extra["ECHOCARE_MASTER_PORT"] = str(port)
        if fault == "run_dir_read_only_on_one_host":
            # node2 alone sees the run directory read-only: its own mount namespace (its slurmd's).
            subprocess.run(["nsenter", "-t", str(slurmd), "-m", "sh", "-c",
                            f"mount --bind '{run_dir}' '{run_dir}' && mount -o remount,bind,ro '{run_dir}'"], check=True)
        start = time.monotonic()
        job_id, code = _submit(cluster, log, 2, 1, *TINY, "--set", f"data.shards={tiny_shards}",
                               "--set", f"train.run_dir={run_dir}", "--set", "train.steps=6",
                               wait=True, timeout=240, extra_env=extra)
        took = time.monotonic() - start
    finally:
        if blocker is not None:
            blocker.kill()
            blocker.wait()
        if fault == "run_dir_read_only_on_one_host":
            subprocess.run(["nsenter", "-t", str(slurmd), "-m", "umount", str(run_dir)], check=False)
    out = tail(log, 300)
    assert code != 0, out
    expected = {
        "unresolvable_rendezvous_host": [r"^0: .*MASTER_ADDR=node9: the rendezvous host 'node9' cannot be resolved on host node1",
                                         r"^1: .*MASTER_ADDR=node9: the rendezvous host 'node9' cannot be resolved on host node2"],
        "mismatched_world_sizes": [rf"^{r}: .*WORLD_SIZE=3: rank 1 on host node2 has WORLD_SIZE=3 but rank 0 on host "
                                   rf"node1 has 2" for r in (0, 1)],
        "master_port_in_use": [rf"^0: .*MASTER_PORT={extra.get('ECHOCARE_MASTER_PORT')}: port \d+ is already in use on host node1"],
        "run_dir_read_only_on_one_host": [rf"^{r}: .*train.run_dir={re.escape(str(run_dir))}: .*not writable \(Read-only file "
                                          rf"system\) \[rank 1 on host node2\]" for r in (0, 1)],
    }[fault]
    for pattern in expected:
        assert re.search(pattern, out, re.M), f"{pattern!r} not in the job's output:\n{out}"
    assert "pre-flight failed" in out and "Traceback" not in out, out
    assert "accelerator" not in out, "DeepSpeed must not have started"
    if fault != "master_port_in_use":  # there rank 1 waits on a port that is not a rendezvous: srun ends it
        assert code == 2, out
    assert took < 120, f"{took:.0f} s"
    assert _snapshot(run_dir) == before, "the failed start touched the run directory"
