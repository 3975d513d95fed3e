"""The container image built and run for real: scripts/build_image.sh --base local-debian (a
debootstrapped Debian bookworm base, no registry) with rootful podman, then, as the image's
non-root user (UID 10001) with no network at all:

- `echocare --version`;
- `echocare shards build` from a synthetic collection written on the host by another user
  (UID 20002) and mounted read-only, into a run directory mounted read-write;
- a 2-rank CPU pretrain (the entry point's `pretrain`, DeepSpeed ZeRO-2) loading the DeepSpeed op
  prebuilt in the image, and `echocare export` (an expected failure for now: docs/container.md,
  "Known problem");
- everything the container wrote is readable by a third, unprivileged host user (UID 20003),
  except the 0600 de-identification path map;
- `podman stop` (SIGTERM) during training: a checkpoint, then exit 124;
- image hygiene: OCI labels, no HEALTHCHECK, the PPA helpers gone, g++ kept.

Needs root (rootful podman, debootstrap); podman, runc and debootstrap are installed with
apt-get when missing, like tests/test_slurm.py installs Slurm. The first build on a machine is
the cold one (~20 min: debootstrap, ~7 GB of venv, the DeepSpeed op); later ones reuse the base
tarball in /var/cache/echocare and podman's layer cache: 1.5-4 min for the whole module then
(docs/container.md has the figures).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/echocare-dist:ci"
CONTAINER_UID = 10001
DATA_UID = 20002      # the host user who wrote the collection
READER_UID = 20003    # an unprivileged host user who reads the results afterwards
# Why each flag: docs/container.md ("podman on this kind of machine").
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
TINY = ["--config", "tiny_cpu", "--set", "tracking.enabled=false", "--set", "train.log_every=1",
        "--set", "train.image_every=1000"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _ensure_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("rootful podman and debootstrap need root (CI runs as root)")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool, path=_sbin_path())]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)} failed (needed: {missing}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def _podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)} -> {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done


def _run_flags(*mounts: str) -> list[str]:
    """`podman run` as the image's user, no network, small host-compatible rlimits, /dev/shm for the loader."""
    flags = ["--network", "none", "--user", f"{CONTAINER_UID}:{CONTAINER_UID}", *LIMITS, "--shm-size", "1g"]
    for mount in mounts:
        flags += ["-v", mount]
    return flags


def _in_container(*args: str, mounts: tuple = (), env: tuple = (), timeout: float = 900) -> subprocess.CompletedProcess:
    extra = [x for item in env for x in ("-e", item)]
    return _podman("run", "--rm", *_run_flags(*mounts), *extra, IMAGE, *args, timeout=timeout, check=False)


def _as_user(uid: int, cmd: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a host command as an unprivileged UID (no supplementary groups), umask 022."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "bash", "-c", 'umask 022; exec "$@"', "as-user", *cmd],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image():
    """Build (or reuse the cached layers of) the image on the local Debian base: its build figures."""
    _ensure_tools()
    env = dict(os.environ, PATH=_sbin_path())
    log = Path(tempfile.gettempdir()) / f"echocare-build-image-{os.getpid()}.log"
    with open(log, "w") as out:
        done = subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh"), "--base", "local-debian",
                               "--engine", "podman", "--tag", IMAGE, "--prune"], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=3300)
    text = log.read_text(errors="replace")
    assert done.returncode == 0, f"scripts/build_image.sh failed ({done.returncode}):\n{text[-6000:]}"
    m = re.search(r"^\[build_image\] image=(\S+) engine=podman base=local-debian seconds=(\d+) size_bytes=(\d+)$",
                  text, re.M)
    assert m and m.group(1) == IMAGE, text[-3000:]
    figures = {"build_s": int(m.group(2)), "size_bytes": int(m.group(3))}
    print(f"image {IMAGE}: built in {figures['build_s']} s, {figures['size_bytes'] / 2**30:.2f} GiB")
    log.unlink()
    return figures


@pytest.fixture(scope="module")
def host_dirs():
    """A world-traversable scratch folder (pytest's tmp dirs are 0700: other UIDs could not enter)."""
    base = Path(tempfile.mkdtemp(prefix="echocare-container-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def collection(host_dirs):
    """The synthetic collection as another user's files: written with umask 022 (so the atomic
    writes' modes are what a user's umask gives), then handed to DATA_UID, who is neither root
    nor the container's user. (The venv's interpreter may live under /root, out of reach of
    other UIDs, so the writer itself runs as root.)"""
    out = host_dirs / "collection"
    done = subprocess.run([sys.executable, "-m", "echocare_dist.cli", "synth", "--config", "tiny_cpu",
                           "--set", "synth.num_images=24", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stdout + done.stderr
    for path in [out, *out.rglob("*")]:
        os.chown(path, DATA_UID, DATA_UID, follow_symlinks=False)
    return out


@pytest.fixture(scope="module")
def run_area(host_dirs):
    """The host folder mounted read-write at /runs: owned by the container's user, as a site
    admin would prepare it."""
    area = host_dirs / "runs"
    area.mkdir()
    area.chmod(0o755)
    os.chown(area, CONTAINER_UID, CONTAINER_UID)
    return area


@pytest.fixture(scope="module")
def shards(image, collection, run_area):
    """`echocare shards build` inside the container, collection mounted read-only."""
    done = _in_container("echocare", "shards", "build", "--config", "tiny_cpu", "--mapping",
                         "/data/collection/labels.yaml", "--out", "/runs/shards", "--no-progress",
                         mounts=(f"{collection}:/data/collection:ro", f"{run_area}:/runs"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"\b\d+ samples\b", done.stdout), done.stdout
    assert (run_area / "shards" / "manifest.json").is_file()
    return run_area / "shards"


def test_version_offline_as_non_root(image):
    done = _in_container("bash", "-c", "id -u; id -g; echocare --version; python -c 'import socket; "
                         "print(sorted({i[1] for i in socket.if_nameindex()}))'")
    assert done.returncode == 0, done.stdout + done.stderr
    uid, gid, version, interfaces = done.stdout.strip().splitlines()[-4:]
    assert (uid, gid) == (str(CONTAINER_UID), str(CONTAINER_UID))
    want = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert version.strip() == f"echocare-dist {want}", version
    assert interfaces == "['lo']", f"--network none should leave loopback only: {interfaces}"


def test_shards_pretrain_export_and_host_can_read(image, shards, run_area, host_dirs):
    mounts = (f"{run_area}:/runs",)
    steps = 4
    started = time.time()
    # TORCH_EXTENSIONS_DIR on the mount, so the op the ranks loaded can be looked at afterwards.
    done = _in_container("pretrain", *TINY, "--set", "data.shards=/runs/shards", "--set", "train.run_dir=/runs/run",
                         "--set", f"train.steps={steps}", "--set", "train.ckpt_every=2", mounts=mounts,
                         env=("ECHOCARE_NPROC=2", "TORCH_EXTENSIONS_DIR=/runs/torch-extensions"), timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "2 ranks" in out, out[-3000:]
    assert f"training complete at step {steps}" in out, out[-3000:]
    run = run_area / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    # The DeepSpeed op prebuilt in the image was used, not rebuilt (minutes of g++ per container):
    # the entry point seeded the folder, and the library is older than this run.
    assert "deepspeed_shm_comm_op built successfully" in out, out[-3000:]
    ops = list((run_area / "torch-extensions").rglob("deepspeed_shm_comm*.so"))
    assert len(ops) == 1 and ops[0].stat().st_mtime < started, [(p, p.stat().st_mtime, started) for p in ops]
    _assert_host_can_read(run_area, host_dirs)

    done = _in_container("echocare", "export", "/runs/run", "--out", "/runs/export", "--no-progress",
                         mounts=mounts, timeout=600)
    err = done.stdout[-4000:] + done.stderr[-4000:]
    # Debian's Python 3.11.2 pickles DeepSpeed's ZeroStageEnum as getattr(EnumClass, name):
    # safe_load accepts exactly that form (tests/test_faults_checkpoint.py), and the export must run.
    assert done.returncode == 0, err
    assert (run_area / "export" / "encoder.safetensors").stat().st_size > 0
    _assert_host_can_read(run_area, host_dirs)


# The de-identification path map (original paths of the shards' samples) is private by design.
PRIVATE = "shards.paths.json"


def _assert_host_can_read(run_area: Path, host_dirs: Path) -> None:
    """Everything the container wrote belongs to its user and is readable by another host user,
    except the private path map, which must stay 0600."""
    written = list(run_area.rglob("*"))
    assert {p.stat().st_uid for p in written} == {CONTAINER_UID}
    assert (run_area / PRIVATE).stat().st_mode & 0o777 == 0o600
    # find fails on a folder it cannot enter, cat on a file it cannot read.
    reader = ('find "$1" -type f ! -path "$1/$2" -print0 | xargs -0 cat > /dev/null '
              '&& find "$1" -type f ! -path "$1/$2" | wc -l && ! cat "$1/$2" 2>/dev/null')
    done = _as_user(READER_UID, ["bash", "-c", reader, "reader", str(run_area), PRIVATE], host_dirs)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == sum(1 for p in written if p.is_file() and p.name != PRIVATE) > 0


def _logs(name: str) -> str:
    done = _podman("logs", name, check=False)
    return done.stdout + done.stderr


def test_sigterm_checkpoints_and_exits_124(image, shards, run_area):
    name = f"echocare-sigterm-{os.getpid()}"
    run = run_area / "preempted"
    try:
        _podman("run", "-d", "--name", name, *_run_flags(f"{run_area}:/runs"), "-e", "ECHOCARE_NPROC=2", IMAGE,
                "pretrain", *TINY, "--set", "data.shards=/runs/shards", "--set", "train.run_dir=/runs/preempted",
                # No periodic checkpoint: the one found afterwards can only come from the signal.
                "--set", "train.steps=100000", "--set", "train.ckpt_every=100000",
                "--set", "train.preempt_check_every=1")
        deadline = time.monotonic() + 600
        logs = ""
        while not re.search(r"step \d+/100000 loss", logs):
            state = _podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            logs = _logs(name)
            assert state == "running", f"container {state} before training started:\n{logs[-4000:]}"
            assert time.monotonic() < deadline, f"no training step after 600 s:\n{logs[-4000:]}"
            time.sleep(2)
        t0 = time.monotonic()
        _podman("stop", "-t", "120", name, timeout=180)
        stop_s = time.monotonic() - t0
        code = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = _logs(name)
    finally:
        _podman("rm", "-f", name, check=False, timeout=120)
    assert code == "124", f"exit {code} after {stop_s:.0f} s (137 = killed after the 120 s grace):\n{logs[-5000:]}"
    m = re.search(r"preempted \(SIGTERM\): checkpoint at step (\d+) complete; exiting with 124", logs)
    assert m, logs[-5000:]
    tag = f"step_{int(m.group(1)):08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == tag
    assert (run / "checkpoints" / tag).is_dir()
    print(f"podman stop -t 120: exit 124 after {stop_s:.1f} s, checkpoint {tag}")


def test_image_hygiene(image):
    info = json.loads(_podman("image", "inspect", IMAGE).stdout)[0]
    config = info.get("Config") or {}
    labels = config.get("Labels") or {}
    want = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert labels.get("org.opencontainers.image.version") == want, labels
    assert labels.get("org.opencontainers.image.title") == "echocare-dist", labels
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels.get("org.opencontainers.image.revision", "")), labels
    assert labels.get("org.opencontainers.image.base.name") == "localhost/echocare-base:bookworm", labels
    assert not config.get("Healthcheck"), "the design has no HEALTHCHECK (docs/container.md)"
    assert config.get("User") == str(CONTAINER_UID)
    assert config.get("Entrypoint") == ["/opt/echocare/docker/entrypoint.sh"]
    # Build-time helpers gone, run-time compilers kept, no pip cache, no build context junk.
    script = ("dpkg-query -W -f='${Package} ${Status}\\n' software-properties-common gpg-agent g++ python3.11-dev "
              "2>/dev/null | grep ' installed$' | cut -d' ' -f1; du -sm /opt/echocare | cut -f1; "
              "ls -A /opt/echocare; test -e /root/.cache/pip || echo no-pip-cache")
    done = _podman("run", "--rm", "--user", "0", *LIMITS, "--network", "none", IMAGE, "bash", "-c", script)
    lines = done.stdout.split()
    assert "g++" in lines and "python3.11-dev" in lines, done.stdout
    assert "no-pip-cache" in lines, done.stdout
    assert "software-properties-common" not in lines and "gpg-agent" not in lines, done.stdout
    for unwanted in (".git", ".venv", ".gpu_wheels", "runs"):
        assert unwanted not in lines, f"{unwanted} reached the image (.dockerignore):\n{done.stdout}"
    print(f"image {IMAGE}: {image['size_bytes'] / 2**30:.2f} GiB, built in {image['build_s']} s")
