"""Shared fixtures. Expensive artefacts (the synthetic dataset, the tiny shards) are built once
per session in a temp dir and shared read-only by every test that needs them."""
from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# DeepSpeed JIT-builds a small op on first start; keep it across runs (CI and developers).
# The venv's bin goes first on PATH so every process (launchers, ranks, Slurm tasks) finds the
# same `ninja`: the venv ships ninja 1.13 and Debian 1.11, whose build logs hash commands
# differently, so mixing them rebuilds the op on every start (minutes under load).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "echocare" / "torch_extensions"))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
os.environ.setdefault("PYTHONUNBUFFERED", "1")

# Every process a test starts inherits this mark, also those that leave our process tree (torchrun
# and DeepSpeed put ranks in their own sessions; a killed launcher's ranks are reparented to init),
# so the orphan check at the end of the session finds them by their environment.
SESSION_MARK = f"ECHOCARE_TEST_SESSION={os.getpid()}-{secrets.token_hex(4)}"
os.environ["ECHOCARE_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def ontology():
    from echocare_dist.ontology import load_ontology
    return load_ontology(REPO / "configs" / "ontology" / "default.yaml")


@pytest.fixture()
def tiny_config():
    from echocare_dist.config import load_config
    return load_config("tiny_cpu")


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory, ontology):
    """The tiny preset's synthetic dataset: (root folder, label mapping file)."""
    from echocare_dist.config import load_config
    from echocare_dist.synth import generate_dataset
    cfg = load_config("tiny_cpu")
    out = tmp_path_factory.mktemp("synth")
    return generate_dataset(out / "ultrasound data", cfg.synth, ontology)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, synth_dataset, ontology):
    """Shards built from the synthetic dataset with the tiny preset: the shard directory."""
    from echocare_dist.config import load_config
    from echocare_dist.curation import build_shards
    cfg = load_config("tiny_cpu")
    out = tmp_path_factory.mktemp("shards")
    build_shards([synth_dataset.mapping], out, cfg, ontology, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_val_shards(tmp_path_factory, synth_dataset, ontology):
    """Shards of the synthetic dataset with a validation hold-out (curation.val_fraction=0.2):
    the shard directory, its held-out set in {dir}/val (tests/test_valsplit.py, test_validation.py)."""
    from echocare_dist.config import load_config
    from echocare_dist.curation import build_shards
    cfg = load_config("tiny_cpu", ["curation.val_fraction=0.2"])
    out = tmp_path_factory.mktemp("val_shards")
    build_shards([synth_dataset.mapping], out, cfg, ontology, progress=False)
    return out


# ------------------------------------------------------------------ fault table (issue 11)
# Every test marked `fault` injects one failure (damaged shard, disk full, killed rank, ...). At the
# end of a run that included any, one line re-measures the figures: passed = clean; failed on a
# pytest-timeout = hang; failed on an AssertionError = silent (the fault went unnoticed or gave a
# wrong result); any other exception, in the test or its fixtures = crash.
_FAULT_KINDS = ("clean", "crash", "hang", "silent")


def _fault_kind(report) -> str | None:
    if report.passed:
        return "clean" if report.when == "call" else None
    if report.skipped:
        return None
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    if message.startswith("Failed: Timeout") or "Timeout >" in message.split("\n", 1)[0]:
        return "hang"
    if message.startswith("AssertionError") or message.startswith("assert "):
        return "silent"
    return "crash"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("fault") is not None:
        kind = _fault_kind(report)
        if kind is not None:
            report.user_properties.append(("fault_kind", kind))


def pytest_terminal_summary(terminalreporter):
    outcomes: dict[str, str] = {}   # test id -> worst kind over its phases
    for reports in terminalreporter.stats.values():
        for report in reports:
            kind = dict(getattr(report, "user_properties", ())).get("fault_kind")
            if kind is None:
                continue
            seen = outcomes.get(report.nodeid)
            if seen is None or seen == "clean":  # a failed teardown after a passed call counts
                outcomes[report.nodeid] = kind
    if not outcomes:
        return
    counts = {k: sum(v == k for v in outcomes.values()) for k in _FAULT_KINDS}
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(f"fault table: tried {len(outcomes)}, " + ", ".join(f"{k} {counts[k]}" for k in _FAULT_KINDS))
    for nodeid, kind in sorted(outcomes.items()):
        if kind != "clean":
            terminalreporter.write_line(f"  {kind}: {nodeid}")


_SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def session_processes() -> dict[int, str]:
    """pid -> command line of every live process that carries this session's mark, but ourselves."""
    mark, found = SESSION_MARK.encode(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if mark not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or a zombie (its environ reads empty)
            continue
        if ppid == os.getpid() and any(helper in cmd for helper in _SESSION_HELPERS):
            continue  # multiprocessing's own helpers of this pytest process: they end when it ends
        found[int(entry)] = cmd[:200]
    return found


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a process behind: wait a little for stragglers, then fail the session,
    naming and killing what is left."""
    deadline = time.monotonic() + float(os.environ.get("ECHOCARE_ORPHAN_GRACE_S", "15"))
    left = session_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} process(es) outlived the tests that started them (killed now):"]
    lines += [f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items())]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if reporter is not None:
        reporter.write_sep("!", "orphaned processes")
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
