"""The suite's orphan check (conftest.pytest_sessionfinish) fails a run that leaves a process behind,
even one that left our process tree (its own session), and kills it."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _run_inner(tmp_path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(TESTS), ECHOCARE_ORPHAN_GRACE_S="1")
    env.pop("ECHOCARE_TEST_SESSION", None)  # the inner session makes its own mark
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_left_process_fails_the_session_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    out = _run_inner(tmp_path, f"""
import subprocess
def test_leaves_a_sleeper():
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open({str(pid_file)!r}, "w").write(str(p.pid))
""")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "outlived the tests" in out.stdout and "sleep 300" in out.stdout
    pid = int(pid_file.read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # killed (a zombie at most)


def test_a_clean_session_passes(tmp_path):
    out = _run_inner(tmp_path, """
import subprocess
def test_waits_for_its_child():
    subprocess.run(["true"], check=True)
""")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "outlived" not in out.stdout


def test_multiprocessing_helpers_of_the_session_are_not_orphans(tmp_path):
    """A process pool in the pytest process starts multiprocessing's resource tracker, which lives
    until pytest exits: it belongs to the session, not to a test."""
    out = _run_inner(tmp_path, """
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
def test_uses_a_spawned_pool():
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        assert pool.submit(abs, -3).result() == 3
""")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "outlived" not in out.stdout
