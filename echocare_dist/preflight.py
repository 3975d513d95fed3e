"""Pre-flight: every check made before any process group exists.

A mistake found after `init_process_group` costs a rendezvous, a DeepSpeed start on every rank
and sometimes a half-written run directory; found here it costs milliseconds and is reported at
once, all problems together, in one format:

    pre-flight failed (2 problems):
      data.shards=/x: not a directory of shards
      tracking.uri=http://mlflow:5000: no answer on mlflow:5000 within 3 s

`run_preflight(cfg)` raises `PreflightError` (a `ConfigError`, so every CLI turns it into exit
code 2). The checks are plain functions `(PreflightContext) -> list[Problem]` listed in `CHECKS`:
a component that needs another early check adds its function there. Checks only read (the run
directory is probed with a temporary file, removed at once) and import torch only when CUDA is
asked for.

$ECHOCARE_PREFLIGHT_TIMEOUT_S bounds each network probe (default 3 s).
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

from . import devices, preflight_ranks, runlock
from .config import Config, ConfigError
from .config_sections import parse_device
from .ontology import Ontology, OntologyError, load_ontology

TIMEOUT_ENV = "ECHOCARE_PREFLIGHT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Problem:
    """One thing that would make the run fail: the config key (or environment variable), its value, why."""
    key: str
    value: object
    reason: str

    def __str__(self) -> str:
        from .redact import redact
        shown = redact(str(self.value)) if self.value != "" else "''"
        return f"{self.key}={shown}: {redact(self.reason)}"


class PreflightError(ConfigError):
    def __init__(self, problems: list[Problem]):
        self.problems = tuple(problems)
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        super().__init__(f"pre-flight failed ({count}):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class PreflightContext:
    """What the checks share: the config, the environment, and the ontology loaded once."""
    cfg: Config
    environ: Mapping[str, str]
    timeout_s: float
    ontology_error: str | None = field(default=None, init=False)
    _ontology: Ontology | None = field(default=None, init=False, repr=False)

    def ontology(self) -> Ontology | None:
        """The run's ontology, or None when it cannot be loaded (then `ontology_error` says why)."""
        if self._ontology is None and self.ontology_error is None:
            try:
                self._ontology = load_ontology(self.cfg.resolve_path(self.cfg.ontology.path))
            except OntologyError as exc:
                self.ontology_error = str(exc)
        return self._ontology


# ------------------------------------------------------------------ filesystem probes
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(directory: Path) -> str | None:
    """None if a file can be created in `directory`, else why not. os.access alone trusts mode bits,
    which root, NFS root-squash and ACLs all contradict: only a real create tells."""
    try:
        fd, name = tempfile.mkstemp(prefix=".preflight-", dir=directory)
    except OSError as exc:
        return f"{directory} is not writable ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    return None


def _creatable_dir_problem(path: Path) -> str | None:
    """None if `path` is a writable directory or can be created as one, else why not."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        return _probe_writable(path)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        return f"cannot be created: {base} is not a directory"
    reason = _probe_writable(base)
    return f"cannot be created: {reason}" if reason else None


# ------------------------------------------------------------------ checks
def check_config(ctx: PreflightContext) -> list[Problem]:
    # load_config validated already; a config built or edited in code since must not slip through.
    try:
        ctx.cfg.validate()
    except ConfigError as exc:
        return [Problem("config", ctx.cfg.name, str(exc))]
    return []


def check_ontology(ctx: PreflightContext) -> list[Problem]:
    if ctx.ontology() is None:
        return [Problem("ontology.path", ctx.cfg.ontology.path, ctx.ontology_error)]
    return []


def check_shards(ctx: PreflightContext) -> list[Problem]:
    value = ctx.cfg.data.shards
    if not value:
        return [Problem("data.shards", value, "not set: point it at a folder built by `echocare shards build`")]
    root = ctx.cfg.resolve_path(value)
    if not root.exists():
        return [Problem("data.shards", value, f"no such directory ({root})")]
    if not root.is_dir():
        return [Problem("data.shards", value, "not a directory of shards")]
    if not os.access(root, os.R_OK | os.X_OK):
        return [Problem("data.shards", value, "directory is not readable")]
    if not any(root.iterdir()):
        return [Problem("data.shards", value, "empty directory: build the shards with `echocare shards build`")]
    ontology = ctx.ontology()
    if ontology is None:
        return []  # the manifest's hash cannot be compared; check_ontology reports why
    # Lazy: the data package imports torch, which a failing config need not pay for.
    from .data import ShardError
    from .data.shards import ShardSet
    try:
        ShardSet.open(root, ontology)
    except ShardError as exc:
        return [Problem("data.shards", value, str(exc))]
    return []


def check_run_dir(ctx: PreflightContext) -> list[Problem]:
    train = ctx.cfg.train
    problems = []
    reason = _creatable_dir_problem(ctx.cfg.resolve_path(train.run_dir))
    if reason:
        problems.append(Problem("train.run_dir", train.run_dir, reason))
    if train.resume not in ("auto", "none"):
        # Resolved as the checkpoint manager resolves it: against the working directory.
        ckpt = Path(train.resume).expanduser()
        if not ckpt.exists():
            problems.append(Problem("train.resume", train.resume, "no such checkpoint directory"))
        elif not ckpt.is_dir():
            problems.append(Problem("train.resume", train.resume, "not a checkpoint directory"))
        elif not os.access(ckpt, os.R_OK | os.X_OK):
            problems.append(Problem("train.resume", train.resume, "checkpoint directory is not readable"))
    return problems


def check_run_dir_lock(ctx: PreflightContext) -> list[Problem]:
    """Another live run on this run directory (runlock.py): refused before it could prune ours."""
    run_dir = ctx.cfg.train.run_dir
    reason = runlock.probe(ctx.cfg.resolve_path(run_dir))
    return [Problem("train.run_dir", run_dir, reason)] if reason else []


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.timeout:
        return f"no answer on {host}:{port} within {timeout_s:g} s"
    except ConnectionRefusedError:
        return f"no server on {host}:{port} (connection refused)"
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror or exc})"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"


def check_tracking(ctx: PreflightContext) -> list[Problem]:
    if not ctx.cfg.tracking.enabled:
        return []
    # Same precedence as tracking.resolve_tracking_uri: the config, then $MLFLOW_TRACKING_URI,
    # then sqlite under run_dir (which check_run_dir covers).
    key, uri = "tracking.uri", ctx.cfg.tracking.uri
    if not uri:
        key, uri = "MLFLOW_TRACKING_URI", ctx.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return []
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            return [Problem(key, uri, f"bad port ({exc})")]
        if not parts.hostname:
            return [Problem(key, uri, "no host in the URI")]
        reason = _tcp_problem(parts.hostname, port, ctx.timeout_s)
    elif scheme == "sqlite":
        # SQLAlchemy form: sqlite:///relative.db, sqlite:////absolute.db, sqlite:// = in memory.
        db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not db or db == ":memory:":
            return []
        reason = _creatable_dir_problem(Path(db).expanduser().parent)
    elif scheme in ("file", ""):
        reason = _creatable_dir_problem(Path(parts.path if scheme else uri).expanduser())
    else:
        return []  # databricks, postgresql, ...: their clients report their own errors
    return [Problem(key, uri, reason)] if reason else []


def check_device(ctx: PreflightContext) -> list[Problem]:
    if parse_device(ctx.cfg.data.device, "data.device", allow_index=False) != "cuda":
        return []
    import torch
    if torch.cuda.is_available():
        return []
    from .data import resolve_loader_kind
    if resolve_loader_kind(ctx.cfg, "cpu") != "dali":
        return []  # the PIL reader decodes on the CPU whatever data.device says
    return [Problem("data.device", "gpu", "DALI cannot decode on the GPU: CUDA is not available here "
                                          "(torch.cuda.is_available() is false); use data.device=cpu or auto")]


def check_cuda(ctx: PreflightContext) -> list[Problem]:
    """CUDA asked for (train.device, $ECHOCARE_DEVICE, GPUs allocated by Slurm or a launcher) but not
    usable: stop with the cause instead of training on the CPU. Then the rank -> GPU mapping."""
    try:
        request = devices.cuda_request(ctx.cfg, ctx.environ)
    except ConfigError as exc:  # a bad $ECHOCARE_DEVICE (train.device itself was validated)
        return [Problem(devices.ENV_VAR, ctx.environ.get(devices.ENV_VAR, ""), str(exc))]
    spec_key, spec = devices.train_device_spec(ctx.cfg.train.device, ctx.environ)
    if request is not None:
        key, value = request
        reason = devices.cuda_problem(ctx.environ)
        if reason:
            return [Problem(key, value, f"CUDA was asked for but is not usable: {reason}")]
    elif spec != "auto" or not (devices.driver_present() and devices.torch_cuda_available()):
        # A CPU run, chosen or by default on a machine without a GPU driver (asked first: it
        # costs no torch import, so a CPU machine's pre-flight stays light).
        return []
    env = ctx.environ
    local_rank = int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)
    world = int(env.get("WORLD_SIZE") or env.get("SLURM_STEP_NUM_TASKS") or 1)
    try:
        devices.rank_device(spec, local_rank=local_rank, local_ranks=devices.local_world_size(env),
                            world_size=world, visible=devices.torch_device_count(), key=spec_key)
    except devices.DeviceError as exc:
        return [Problem(spec_key, spec, str(exc))]
    return []


def check_rendezvous(ctx: PreflightContext) -> list[Problem]:
    """Several ranks: the rendezvous host resolves here, the port is one, WORLD_SIZE matches srun's
    tasks (preflight_ranks.py; the ranks then compare notes in run_preflight's roll call)."""
    return [Problem(*triple) for triple in preflight_ranks.rendezvous_problems(ctx.environ)]


class Check(NamedTuple):
    name: str
    run: Callable[[PreflightContext], list[Problem]]


# Order is report order. Per-host mounts (shards, run directory) are checked by every rank on its
# own host; the roll call (run_preflight) gathers every host's problems into one report.
CHECKS: tuple[Check, ...] = (
    Check("config", check_config),
    Check("ontology", check_ontology),
    Check("shards", check_shards),
    Check("run_dir", check_run_dir),
    Check("run_dir_lock", check_run_dir_lock),
    Check("tracking", check_tracking),
    Check("device", check_device),
    Check("cuda", check_cuda),
    Check("rendezvous", check_rendezvous),
)


def _timeout_from(environ: Mapping[str, str]) -> float:
    raw = environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise PreflightError([Problem(TIMEOUT_ENV, raw, "must be a positive number of seconds")])
    return value


def find_problems(cfg: Config, *, environ: Mapping[str, str] | None = None,
                  checks: tuple[Check, ...] = CHECKS) -> list[Problem]:
    environ = os.environ if environ is None else environ
    ctx = PreflightContext(cfg, environ, _timeout_from(environ))
    return [problem for check in checks for problem in check.run(ctx)]


def run_preflight(cfg: Config, *, environ: Mapping[str, str] | None = None,
                  checks: tuple[Check, ...] = CHECKS) -> None:
    """Raise PreflightError listing every problem the checks find; return quietly if none.
    With several ranks, every rank's problems, on every rank (preflight_ranks.roll_call: before
    any process group, bounded by train.dist_timeout_s)."""
    problems = find_problems(cfg, environ=environ, checks=checks)
    environ = os.environ if environ is None else environ
    triples = preflight_ranks.roll_call(environ, [(p.key, p.value, p.reason) for p in problems],
                                        float(cfg.train.dist_timeout_s))
    problems = [Problem(*triple) for triple in triples]
    if problems:
        raise PreflightError(problems)
