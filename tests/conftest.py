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
