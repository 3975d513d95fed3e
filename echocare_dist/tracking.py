"""MLflow tracking for pretraining (rank 0) and fine-tuning: params (resolved config), metrics,
artifacts, reconstruction grids.

Where runs go: `tracking.uri` if set, else $MLFLOW_TRACKING_URI (a server, e.g.
http://mlflow:5000), else an embedded SQLite store at {run_dir}/mlflow.db with artifacts under
{run_dir}/mlartifacts (no server, nothing written to ./mlruns). A resumed run reopens the MLflow
run whose id the checkpoint recorded, so one training is one MLflow run across requeues.

A tracking outage must not kill a multi-day run: after a successful start, logging errors
are reported (once per kind) and training goes on. Failing to start is an error, so a
misconfigured URI is seen at once.

Credentials in the URI (user:password@, ?token=) never leave this module: messages, logs and
params show the URI through redact.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from .redact import redact

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000   # MLflow's limit on a param value
PARAMS_PER_BATCH = 100   # MLflow's limit on params per log_batch
METRICS_PER_BATCH = 1000


class TrackingError(RuntimeError):
    pass


def resolve_tracking_uri(uri: str, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}", (run_dir / "mlartifacts").as_uri()


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """{'train': {'steps': 40}} -> {'train.steps': '40'}; lists become their repr; credentials are masked."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = redact(str(obj))[:MAX_PARAM_VALUE]
    return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """MLflow run of this training. Built on every rank; only an `active` one (rank 0) talks to MLflow."""

    def __init__(self, active: bool, uri: str = "", experiment: str = "", run_name: str = "",
                 run_dir: Path | None = None):
        self.active = active
        self.run_id: str | None = None
        self._client = None
        self._warned: set[str] = set()
        if active:
            self.uri, self._artifact_location = resolve_tracking_uri(uri, Path(run_dir))
            self.shown_uri = redact(self.uri)  # for messages: the real one goes to the client only
            self.experiment, self.run_name = experiment, run_name

    # ------------------------------------------------------------------ lifecycle
    def start(self, resume_run_id: str | None = None) -> str | None:
        """Open (or reopen) the run; returns its id. Raises TrackingError if MLflow is unreachable."""
        if not self.active:
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            if resume_run_id:
                try:
                    self._client.get_run(resume_run_id)
                    self._client.update_run(resume_run_id, status="RUNNING")
                    self.run_id = resume_run_id
                    log.info("MLflow: continuing run %s at %s", self.run_id, self.shown_uri)
                    return self.run_id
                except MlflowException:
                    log.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run",
                                resume_run_id, self.shown_uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                exp_id = self._client.create_experiment(self.experiment, artifact_location=self._artifact_location)
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    self._client.restore_experiment(exp_id)
            tags = {"resumed_from_run_id": resume_run_id} if resume_run_id else None
            run = self._client.create_run(exp_id, run_name=self.run_name or None, tags=tags)
            self.run_id = run.info.run_id
        except MlflowException as exc:
            raise TrackingError(f"cannot start an MLflow run at {self.shown_uri} "
                                f"(experiment {self.experiment!r}): {redact(str(exc))}") from None
        except OSError as exc:
            raise TrackingError(f"cannot reach MLflow at {self.shown_uri}: {redact(str(exc))}") from None
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, self.shown_uri)
        return self.run_id

    def finish(self, status: str) -> None:
        """FINISHED, FAILED, or SCHEDULED (preempted; the requeued job continues this run)."""
        self._safely("finish", lambda: self._client.set_terminated(self.run_id, status=status))

    # ------------------------------------------------------------------ logging
    def _safely(self, what: str, fn) -> None:
        if not self.active or self._client is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            if what not in self._warned:
                self._warned.add(what)
                log.warning("MLflow %s failed (training continues; further failures of this kind are "
                            "not reported): %s", what, redact(str(exc)))

    def log_params(self, params: dict[str, str]) -> None:
        """Log new params; on a resumed run, changed values are recorded as tags (MLflow params are immutable)."""
        def do():
            from mlflow.entities import Param, RunTag
            existing = self._client.get_run(self.run_id).data.params
            clean = {k: redact(v) for k, v in params.items()}
            new = [Param(k, v) for k, v in clean.items() if k not in existing]
            changed = [RunTag(f"changed_on_resume.{k}", v) for k, v in clean.items()
                       if k in existing and existing[k] != v]
            for chunk in _chunks(new, PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=chunk)
            for chunk in _chunks(changed, PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=chunk)
        self._safely("log_params", do)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        def do():
            import time

            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            for chunk in _chunks(items, METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
        self._safely("log_metrics", do)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._safely(f"log_artifact({artifact_path})",
                     lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))
