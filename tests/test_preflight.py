"""Pre-flight (echocare_dist/preflight.py): each check alone, the one message format, and the
wiring: `echocare pretrain` and launch/pretrain.py stop with exit 2 before any rank or process group."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echocare_dist import preflight
from echocare_dist.config import ConfigError, load_config
from echocare_dist.data.testing import write_shards
from echocare_dist.preflight import (CHECKS, PreflightError, Problem, check_config, check_device, check_ontology,
                                     check_run_dir, check_shards, check_tracking, find_problems, run_preflight)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FOREIGN_HASH = "0123456789abcdef"


def free_port() -> int:
    """A local port nobody listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ontology) -> Path:
    root = tmp_path_factory.mktemp("preflight_shards")
    write_shards(root, ontology, counts=(3, 2), size=(32, 24))
    return root


def config(tmp_path: Path, shards: Path | str, *overrides: str):
    return load_config("tiny_cpu", [f"data.shards={shards}", f"train.run_dir={tmp_path / 'run'}",
                                    "tracking.enabled=false", *overrides])


def problems(check, cfg, environ=None) -> list[Problem]:
    return find_problems(cfg, environ={} if environ is None else environ,
                         checks=(preflight.Check(check.__name__, check),))


def test_message_lists_every_problem_with_key_and_value():
    err = PreflightError([Problem("data.shards", "/x", "not a directory of shards"),
                          Problem("tracking.uri", "http://h:1", "no answer on h:1 within 3 s")])
    assert str(err) == ("pre-flight failed (2 problems):\n  data.shards=/x: not a directory of shards\n"
                        "  tracking.uri=http://h:1: no answer on h:1 within 3 s")
    assert isinstance(err, ConfigError) and len(err.problems) == 2
    one = PreflightError([Problem("data.shards", "", "not set")])
    assert str(one) == "pre-flight failed (1 problem):\n  data.shards='': not set"


def test_a_good_setup_passes_every_check(tmp_path, shards):
    assert [c.name for c in CHECKS] == ["config", "ontology", "shards", "run_dir", "run_dir_lock", "tracking", "device",
                                        "cuda", "rendezvous"]
    run_preflight(config(tmp_path, shards), environ={})
    assert not (tmp_path / "run").exists(), "the pre-flight must not create the run directory"
    assert list(tmp_path.iterdir()) == [], "the write probe must leave nothing behind"


def test_all_problems_are_reported_together(tmp_path):
    cfg = config(tmp_path, tmp_path / "nowhere", "tracking.enabled=true",
                 f"tracking.uri=http://127.0.0.1:{free_port()}", "train.resume=/no/such/ckpt")
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg, environ={})
    keys = [p.key for p in info.value.problems]
    assert keys == ["data.shards", "train.resume", "tracking.uri"], str(info.value)
    assert str(info.value).startswith("pre-flight failed (3 problems):\n  data.shards=")


def test_config_is_validated_again(tmp_path, shards):
    cfg = config(tmp_path, shards)
    cfg.model.img_size = 60  # edited in code after load_config: not divisible by the mask patch
    (found,) = problems(check_config, cfg)
    assert found.key == "config" and "model.img_size=60" in found.reason


def test_unreadable_ontology_is_reported_and_shards_not_compared(tmp_path, shards):
    cfg = config(tmp_path, shards, f"ontology.path={tmp_path / 'missing.yaml'}")
    (found,) = find_problems(cfg, environ={})
    assert found.key == "ontology.path" and "missing.yaml" in str(found)


def shards_case(tmp: Path, case: str) -> Path | str:
    """A data.shards value that is wrong in the way `case` names."""
    path = tmp / case
    if case == "unset":
        return ""
    if case == "file":
        path.write_text("x")
    elif case != "absent":
        path.mkdir()
    if case == "no_manifest":
        (path / "shard-000000.tar").write_bytes(b"")
    elif case == "bad_manifest":
        (path / "manifest.json").write_text("{")
    return path


@pytest.mark.parametrize("case, reason", [
    ("unset", "not set"),
    ("absent", "no such directory"),
    ("file", "not a directory of shards"),
    ("empty", "empty directory"),
    ("no_manifest", "manifest.json is missing"),
    ("bad_manifest", "manifest.json"),
])
def test_shards_folder_problems(tmp_path, case, reason):
    value = shards_case(tmp_path, case)
    (found,) = problems(check_shards, config(tmp_path, value))
    assert found.key == "data.shards" and found.value == str(value) and reason in found.reason


def test_shards_with_another_ontology_name_both_hashes(tmp_path, ontology):
    write_shards(tmp_path / "foreign", ontology, counts=(2,), size=(32, 24), ontology_hash=FOREIGN_HASH)
    (found,) = problems(check_shards, config(tmp_path, tmp_path / "foreign"))
    assert FOREIGN_HASH in found.reason and ontology.hash in found.reason


def test_valid_shards_pass(tmp_path, shards):
    assert problems(check_shards, config(tmp_path, shards)) == []


def test_run_dir_problems(tmp_path, shards):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (found,) = problems(check_run_dir, config(tmp_path, shards, f"train.run_dir={blocker}"))
    assert found.key == "train.run_dir" and "exists and is not a directory" in found.reason
    (found,) = problems(check_run_dir, config(tmp_path, shards, f"train.run_dir={blocker / 'a' / 'run'}"))
    assert "cannot be created" in found.reason and str(blocker) in found.reason
    existing = tmp_path / "existing"
    existing.mkdir()
    assert problems(check_run_dir, config(tmp_path, shards, f"train.run_dir={existing}")) == []
    assert problems(check_run_dir, config(tmp_path, shards, f"train.run_dir={tmp_path / 'new' / 'deeper'}")) == []
    assert not (tmp_path / "new").exists()


def test_unwritable_run_dir(tmp_path, shards, monkeypatch):
    # A real create is the probe (mode bits lie for root and on NFS): make it fail as a read-only mount would.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    (found,) = problems(check_run_dir, config(tmp_path, shards))
    assert found.key == "train.run_dir" and "not writable (Permission denied)" in found.reason


def test_resume_directory(tmp_path, shards):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for value in ("auto", "none", str(ckpt)):
        assert problems(check_run_dir, config(tmp_path, shards, f"train.resume={value}")) == [], value
    (found,) = problems(check_run_dir, config(tmp_path, shards, f"train.resume={tmp_path / 'absent'}"))
    assert found.key == "train.resume" and "no such checkpoint directory" in found.reason
    (tmp_path / "f").write_text("x")
    (found,) = problems(check_run_dir, config(tmp_path, shards, f"train.resume={tmp_path / 'f'}"))
    assert "not a checkpoint directory" in found.reason


def test_tracking_http_refused_and_reachable(tmp_path, shards):
    port = free_port()
    cfg = config(tmp_path, shards, "tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}")
    start = time.monotonic()
    (found,) = problems(check_tracking, cfg)
    assert time.monotonic() - start < 5
    assert str(found) == f"tracking.uri=http://127.0.0.1:{port}: no server on 127.0.0.1:{port} (connection refused)"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        up = config(tmp_path, shards, "tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{server.getsockname()[1]}")
        assert problems(check_tracking, up) == []


def test_tracking_timeout_is_configurable(tmp_path, shards, monkeypatch):
    seen = {}

    def silent(address, timeout):
        seen.update(address=address, timeout=timeout)
        raise socket.timeout("timed out")
    monkeypatch.setattr(preflight.socket, "create_connection", silent)
    cfg = config(tmp_path, shards, "tracking.enabled=true", "tracking.uri=https://mlflow.example")
    (found,) = problems(check_tracking, cfg, {preflight.TIMEOUT_ENV: "0.5"})
    assert seen == {"address": ("mlflow.example", 443), "timeout": 0.5}
    assert found.reason == "no answer on mlflow.example:443 within 0.5 s"
    problems(check_tracking, cfg)
    assert seen["timeout"] == preflight.DEFAULT_TIMEOUT_S
    with pytest.raises(PreflightError, match=preflight.TIMEOUT_ENV + "=soon: must be a positive number"):
        problems(check_tracking, cfg, {preflight.TIMEOUT_ENV: "soon"})


def test_tracking_uri_from_the_environment_and_local_stores(tmp_path, shards):
    port = free_port()
    enabled = config(tmp_path, shards, "tracking.enabled=true")
    assert problems(check_tracking, enabled) == []  # sqlite under run_dir: check_run_dir's business
    (found,) = problems(check_tracking, enabled, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert found.key == "MLFLOW_TRACKING_URI"
    assert problems(check_tracking, config(tmp_path, shards), {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for uri in (f"sqlite:///{blocker}/sub/mlflow.db", f"file://{blocker}/mlruns", f"{blocker}/mlruns"):
        (found,) = problems(check_tracking, config(tmp_path, shards, "tracking.enabled=true", f"tracking.uri={uri}"))
        assert found.key == "tracking.uri" and str(blocker) in found.reason, uri
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", f"file://{tmp_path}/mlruns", "databricks://profile"):
        assert problems(check_tracking, config(tmp_path, shards, "tracking.enabled=true", f"tracking.uri={uri}")) == []


def test_gpu_decoding_without_cuda(tmp_path, shards, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (found,) = problems(check_device, config(tmp_path, shards, "data.device=gpu", "data.loader=dali"))
    assert found.key == "data.device" and "CUDA is not available" in found.reason
    # loader=auto falls back to the PIL reader, which decodes on the CPU: nothing would fail.
    assert problems(check_device, config(tmp_path, shards, "data.device=gpu", "data.loader=auto")) == []
    assert problems(check_device, config(tmp_path, shards, "data.device=cpu", "data.loader=dali")) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert problems(check_device, config(tmp_path, shards, "data.device=gpu", "data.loader=dali")) == []


def test_failed_checks_need_no_torch(tmp_path):
    code = ("import sys; from echocare_dist.config import load_config; from echocare_dist.preflight import find_problems;"
            f"cfg = load_config('tiny_cpu', ['data.shards={tmp_path}/absent', 'train.run_dir={tmp_path}/run']);"
            "assert find_problems(cfg, environ={}); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ------------------------------------------------------------------ wiring: exit 2 before any rank
def pretrain(tmp_path: Path, *sets: str, launcher: str = "echocare") -> tuple[subprocess.CompletedProcess, float]:
    args = [a for s in (f"train.run_dir={tmp_path / 'run'}", "tracking.enabled=false", *sets) for a in ("--set", s)]
    if launcher == "echocare":
        cmd = [str(BIN / "echocare"), "pretrain", "--nproc", "2", "--config", "tiny_cpu", *args]
    else:
        cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", "tiny_cpu", *args]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def assert_stopped_before_any_rank(result: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "echocare pretrain: error: pre-flight failed" in result.stderr
    everything = result.stdout + result.stderr
    for sign_of_a_rank in ("DeepSpeed", "accelerator", "torch.distributed", "elastic", "init_process_group",
                           "Traceback"):
        assert sign_of_a_rank not in everything, everything
    assert not (tmp_path / "run").exists(), "nothing may be written before the pre-flight passes"


def test_echocare_pretrain_missing_shards_exits_2_before_any_rank(tmp_path):
    result, seconds = pretrain(tmp_path, f"data.shards={tmp_path / 'absent'}")
    assert_stopped_before_any_rank(result, tmp_path)
    assert f"data.shards={tmp_path / 'absent'}: no such directory" in result.stderr
    assert seconds < 60, f"took {seconds:.0f} s"


@pytest.mark.slow  # the check itself is covered in-process above
def test_echocare_pretrain_ontology_mismatch_names_both_hashes(tmp_path, ontology):
    write_shards(tmp_path / "foreign", ontology, counts=(2,), size=(32, 24), ontology_hash=FOREIGN_HASH)
    result, _ = pretrain(tmp_path, f"data.shards={tmp_path / 'foreign'}")
    assert_stopped_before_any_rank(result, tmp_path)
    assert FOREIGN_HASH in result.stderr and ontology.hash in result.stderr


@pytest.mark.slow  # the check itself is covered in-process above
def test_echocare_pretrain_unreachable_tracking_exits_2_within_seconds(tmp_path, shards):
    uri = f"http://127.0.0.1:{free_port()}"
    result, seconds = pretrain(tmp_path, f"data.shards={shards}", "tracking.enabled=true", f"tracking.uri={uri}")
    assert_stopped_before_any_rank(result, tmp_path)
    assert f"tracking.uri={uri}: no server on" in result.stderr
    assert seconds < 60, f"took {seconds:.0f} s"


def test_launch_script_runs_the_preflight_in_the_rank(tmp_path):
    result, _ = pretrain(tmp_path, f"data.shards={tmp_path / 'absent'}", launcher="launch")
    assert_stopped_before_any_rank(result, tmp_path)
    assert "pre-flight failed (1 problem):\n  data.shards=" in result.stderr


@pytest.mark.slow
def test_every_rank_under_torchrun_stops_at_the_preflight(tmp_path):
    """No rank waits for another: each runs the pre-flight itself, before any process group."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "launch" / "pretrain.py"),
           "--config", "tiny_cpu", "--set", f"data.shards={tmp_path / 'absent'}",
           "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false"]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and time.monotonic() - start < 120, result.stderr
    # torchrun SIGTERMs the other rank as soon as one exits, so the second message may never be printed.
    assert result.stderr.count("echocare pretrain: error: pre-flight failed (1 problem)") >= 1, result.stderr
    assert f'File "{REPO / "echocare_dist"}' not in result.stderr, "a rank died with a traceback: " + result.stderr
    assert "accelerator" not in result.stdout + result.stderr, "DeepSpeed must not even be imported"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ several ranks (preflight_ranks.py)
def _rank_env(rank: int, world: int, port: int, **extra: str) -> dict:
    return dict(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


def test_unresolvable_node_list_is_named_with_the_host(tmp_path, shards):
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "echocare-missing[1-2]",
           "SLURM_JOB_ID": "7"}
    found = [p for p in find_problems(config(tmp_path, shards), environ=env) if p.key == "SLURM_STEP_NODELIST"]
    assert len(found) == 1, found
    assert found[0].value == "echocare-missing[1-2]"
    assert "'echocare-missing1' cannot be resolved on host " + socket.gethostname() in found[0].reason


def test_world_size_that_disagrees_with_srun_is_refused(tmp_path, shards):
    env = dict(_rank_env(1, 3, free_port()), SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2")
    found = [p for p in find_problems(config(tmp_path, shards), environ=env) if p.key == "WORLD_SIZE"]
    assert len(found) == 1 and "Slurm started 2 tasks" in found[0].reason, found
    # torchrun under srun has ranks of its own: not a mismatch.
    env["TORCHELASTIC_RUN_ID"] = "x"
    assert not [p for p in find_problems(config(tmp_path, shards), environ=env) if p.key == "WORLD_SIZE"]


def _roll_call_all(envs: list[dict], problems: list[list], timeout_s: float = 20.0) -> list:
    """roll_call of every rank at once (threads: TCPStore clients of one process work like processes)."""
    from concurrent.futures import ThreadPoolExecutor
    from echocare_dist import launch_env, preflight_ranks
    with ThreadPoolExecutor(len(envs)) as pool:
        futures = [pool.submit(preflight_ranks.roll_call, env, own, timeout_s) for env, own in zip(envs, problems)]
        results = [f.result(timeout=timeout_s + 10) for f in futures]
    launch_env.take_store()  # a clean roll call hands a store over; nothing here builds a group on it
    return results


def test_roll_call_of_agreeing_ranks_passes_and_hands_the_store_over():
    from echocare_dist import launch_env, preflight_ranks
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        handed = []
        mp.setattr(launch_env, "hand_over_store", handed.append)
        results = _roll_call_all([_rank_env(r, 2, port) for r in range(2)], [[], []])
    assert results == [[], []]
    assert len(handed) == 2, "each rank keeps its connected store for the process group"
    # A world of one has nobody to call: the problems come back untouched, no store, no torch needed.
    assert preflight_ranks.roll_call({}, [("k", "v", "r")], 5.0) == [("k", "v", "r")]


def test_roll_call_reports_one_hosts_problem_on_every_rank():
    port, host = free_port(), socket.gethostname()
    problem = ("train.run_dir", "/shared/run", "/shared/run is not writable (Read-only file system)")
    results = _roll_call_all([_rank_env(r, 2, port) for r in range(2)], [[], [problem]])
    for got in results:
        assert got == [(problem[0], problem[1], f"{problem[2]} [rank 1 on host {host}]")], got


def test_roll_call_merges_the_same_problem_of_several_ranks():
    port, host = free_port(), socket.gethostname()
    problem = ("data.shards", "/x", "no such directory (/x)")
    # Values need not be strings (a Path here): they travel as text.
    as_path = (problem[0], Path(problem[1]), problem[2])
    results = _roll_call_all([_rank_env(r, 2, port) for r in range(2)], [[as_path], [problem]])
    assert results[0] == results[1] == [("data.shards", "/x", f"no such directory (/x) [ranks 0, 1 on host {host}]")]


def test_roll_call_refuses_mismatched_world_sizes_on_every_rank():
    port, host = free_port(), socket.gethostname()
    start = time.monotonic()
    results = _roll_call_all([_rank_env(0, 2, port), _rank_env(1, 3, port)], [[], []])
    assert time.monotonic() - start < 15, "a mismatch is seen when the entry arrives, not after the timeout"
    for got in results:
        assert [p[0] for p in got] == ["WORLD_SIZE"], got
        assert f"rank 1 on host {host} has WORLD_SIZE=3 but rank 0 on host {host} has 2" in got[0][2]


def test_roll_call_names_a_master_port_in_use_and_a_rank_that_never_came():
    host = socket.gethostname()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        from echocare_dist import preflight_ranks
        got = preflight_ranks.roll_call(_rank_env(0, 2, port), [], 5.0)
    assert [p[0] for p in got] == ["MASTER_PORT"], got
    assert f"port {port} is already in use on host {host}" in got[0][2]
    start = time.monotonic()
    got = preflight_ranks.roll_call(_rank_env(0, 2, free_port()), [], 2.0)
    assert time.monotonic() - start < 10
    assert [p[0] for p in got] == ["train.dist_timeout_s"] and "rank(s) [1] of 2 did not reach" in got[0][2], got
