"""Shared fixtures. Expensive artefacts (the synthetic dataset, the tiny shards) are built once
per session in a temp dir and shared read-only by every test that needs them."""
from __future__ import annotations

import os
import sys
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
