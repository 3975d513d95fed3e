"""The tags that say where an MLflow run came from: code (git commit, dirty tree, package
version), who and where (user, host), how it was launched (launcher, world size, Slurm job).

`MlflowClient.create_run` sets none of MLflow's own context tags (only the fluent `mlflow.start_run`
does), so the UI showed user "unknown" and no commit: we set MLflow's reserved keys ourselves
(`mlflow.user`, `mlflow.source.*`), which the UI shows in its run header, plus `echocare.*` keys.

The commit comes from $ECHOCARE_GIT_COMMIT when set (a Docker image built without .git records it
there), else from `git` run in the package's checkout; an installed wheel has neither, and then
the tag says "unknown" rather than guessing.
"""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
from pathlib import Path

from .paths import REPO_ROOT

GIT_TIMEOUT_S = 5       # a hung network file system must not hold up the start of a run
UNKNOWN = "unknown"

# MLflow's reserved tag keys (mlflow.utils.mlflow_tags), spelled out: importing them would load
# the whole mlflow package for five constants.
MLFLOW_USER = "mlflow.user"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_GIT_BRANCH = "mlflow.source.git.branch"


def _git(*args: str) -> str | None:
    try:
        # --no-optional-locks: `status` must not rewrite the index of a tree someone else works in.
        proc = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, str]:
    """{commit, dirty, branch}: commit "unknown" outside a checkout; dirty "true"/"false"/"unknown"."""
    commit = os.environ.get("ECHOCARE_GIT_COMMIT", "").strip()
    if commit:
        return dict(commit=commit, dirty=os.environ.get("ECHOCARE_GIT_DIRTY", UNKNOWN), branch="")
    if not (Path(REPO_ROOT) / ".git").exists():
        return dict(commit=UNKNOWN, dirty=UNKNOWN, branch="")
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return dict(commit=UNKNOWN, dirty=UNKNOWN, branch="")
    status = _git("status", "--porcelain", "--untracked-files=no")
    branch = _git("rev-parse", "--abbrev-ref", "HEAD") or ""
    return dict(commit=commit, dirty=UNKNOWN if status is None else str(bool(status)).lower(),
                branch="" if branch == "HEAD" else branch)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container UID without a passwd entry
        return os.environ.get("USER") or f"uid-{os.getuid()}"


def context_tags(source: str = "", launcher: str = "", world_size: int = 1) -> dict[str, str]:
    """Tags for a new (or resumed) run of this process; `source` names the job (echocare pretrain)."""
    from . import __version__

    git = git_state()
    slurm_job = os.environ.get("SLURM_JOB_ID", "")
    tags = {
        MLFLOW_USER: current_user(),
        MLFLOW_SOURCE_NAME: source or Path(sys.argv[0]).name,
        MLFLOW_SOURCE_TYPE: "JOB" if slurm_job else "LOCAL",
        MLFLOW_GIT_COMMIT: git["commit"],
        "echocare.git_dirty": git["dirty"],
        "echocare.version": __version__,
        "echocare.host": socket.gethostname(),
        "echocare.launcher": launcher or "single",
        "echocare.world_size": str(world_size),
        "echocare.python": sys.version.split()[0],
    }
    if git["branch"]:
        tags[MLFLOW_GIT_BRANCH] = git["branch"]
    if slurm_job:
        tags["echocare.slurm_job_id"] = slurm_job
    return tags


def pretraining_link_tags(encoder_meta: dict) -> dict[str, str]:
    """Tags that tie a fine-tuning run to the export it started from and to that export's
    pretraining run (encoder.json `source.mlflow_run_id`): search with
    `tags."echocare.pretrain_run_id" = '<id>'` to list every fine-tuning of one pretraining."""
    source = encoder_meta.get("source") or {}
    files = encoder_meta.get("files") or {}
    tags = {"echocare.export_sha256": (files.get("encoder") or {}).get("sha256") or UNKNOWN,
            "echocare.export_step": str(source.get("step")),
            "echocare.export_arch": str(encoder_meta.get("arch"))}
    if source.get("mlflow_run_id"):
        tags["echocare.pretrain_run_id"] = str(source["mlflow_run_id"])
    return tags
