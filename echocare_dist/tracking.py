"""MLflow tracking for pretraining (rank 0), export and fine-tuning: params (resolved config),
metrics, system metrics (tracking_system.py), context tags (tracking_context.py: commit, user,
host, launcher), images with their step (reconstruction grids, fine-tuning figures), artifacts.
A run is named after its run directory unless `tracking.run_name` says otherwise. docs/tracking.md.

Where runs go: `tracking.uri` if set, else $MLFLOW_TRACKING_URI (a server, e.g.
http://mlflow:5000), else an embedded SQLite store at {run_dir}/mlflow.db with artifacts under
{run_dir}/mlartifacts (no server, nothing written to ./mlruns); a `sqlite:///DIR/x.db` URI keeps
its artifacts in DIR/mlartifacts, so several stages can share one store (the demo does). A
resumed run reopens the MLflow run whose id the checkpoint recorded, so one training is one MLflow
run across requeues.

A tracking outage must not kill a multi-day run: after a successful start, logging errors
are reported (once per kind) and training goes on. Failing to start is an error, so a
misconfigured URI is seen at once.

Credentials in the URI (user:password@, ?token=) never leave this module: messages, logs and
params show the URI through redact.py.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterable

from .redact import redact

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000   # MLflow's limit on a param value
MAX_TAG_VALUE = 8000     # MLflow's limit on a tag value
PARAMS_PER_BATCH = 100   # MLflow's limit on params per log_batch
METRICS_PER_BATCH = 1000
SQLITE_PREFIX = "sqlite:///"


class TrackingError(RuntimeError):
    pass


def resolve_tracking_uri(uri: str, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(SQLITE_PREFIX):
        # MLflow would put the artifacts of a new experiment under ./mlruns of whatever directory
        # the process started in: keep them beside the database instead.
        db = uri[len(SQLITE_PREFIX):].split("?")[0]
        if db and db != ":memory:":
            return uri, (Path(db).expanduser().resolve().parent / "mlartifacts").as_uri()
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
                 run_dir: Path | None = None, *, source: str = "", launcher: str = "", world_size: int = 1,
                 system_metrics_s: float = 0.0, tags: dict[str, str] | None = None):
        """`source` names the job in the run's tags ("echocare pretrain"); `tags` are added to the
        context tags (the fine-tuning runner's link to its pretraining run); `system_metrics_s` > 0
        samples CPU/memory/GPU at that interval while the run is open."""
        self.active = active
        self.run_id: str | None = None
        self._client = None
        self._warned: set[str] = set()
        self._system = None
        if active:
            self.uri, self._artifact_location = resolve_tracking_uri(uri, Path(run_dir))
            self.shown_uri = redact(self.uri)  # for messages: the real one goes to the client only
            self.experiment = experiment
            self.run_name = run_name or (Path(run_dir).resolve().name if run_dir is not None else "")
            self._context = dict(source=source, launcher=launcher, world_size=world_size)
            self._extra_tags = dict(tags or {})
            self.system_metrics_s = system_metrics_s

    @classmethod
    def from_config(cls, active: bool, tracking_cfg, run_dir: Path, experiment: str = "", **context) -> "Tracker":
        """A Tracker for `tracking_cfg` (the `tracking` config section); `experiment` overrides its own."""
        t = tracking_cfg
        return cls(active and t.enabled, t.uri, experiment or t.experiment, t.run_name, run_dir,
                   system_metrics_s=t.system_metrics_interval, **context)

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
                    # The requeued job may run other code on another host: the tags say the latest.
                    self.set_tags(self._start_tags())
                    self._start_system_metrics(resumed=True)
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
            tags = self._start_tags()
            if resume_run_id:
                tags["resumed_from_run_id"] = resume_run_id
            run = self._client.create_run(exp_id, run_name=self.run_name or None, tags=tags)
            self.run_id = run.info.run_id
        except MlflowException as exc:
            raise TrackingError(f"cannot start an MLflow run at {self.shown_uri} "
                                f"(experiment {self.experiment!r}): {redact(str(exc))}") from None
        except OSError as exc:
            raise TrackingError(f"cannot reach MLflow at {self.shown_uri}: {redact(str(exc))}") from None
        log.info("MLflow: run %s (%r) in experiment %r at %s", self.run_id, self.run_name, self.experiment,
                 self.shown_uri)
        self._start_system_metrics(resumed=False)
        return self.run_id

    def attach(self, run_id: str) -> bool:
        """Log into an existing run without reopening it (its status stays): `echocare export`
        adds the export to the pretraining run. False, with a warning, when it cannot be reached."""
        if not self.active:
            return False
        from mlflow import MlflowClient
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            self._client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, bad URI: all mean "not there"
            log.warning("MLflow run %s is not reachable at %s: %s", run_id, self.shown_uri, redact(str(exc)))
            self._client = None
            return False
        self.run_id = run_id
        return True

    def _start_tags(self) -> dict[str, str]:
        from .tracking_context import context_tags
        return {**context_tags(**self._context), **self._extra_tags}

    def _start_system_metrics(self, resumed: bool) -> None:
        from .tracking_system import SystemMetrics
        self._system = SystemMetrics(self.run_id, self.uri, self.system_metrics_s, resumed)
        self._system.start()

    def finish(self, status: str) -> None:
        """FINISHED, FAILED, or SCHEDULED (preempted; the requeued job continues this run)."""
        if self._system is not None:
            self._system.stop()  # before the status changes: its last flush needs a running run
            self._system = None
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

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._safely(f"log_artifacts({artifact_path})",
                     lambda: self._client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_image(self, png: bytes | Path, key: str, step: int) -> None:
        """An image under `key` at `step`: the UI's image view gets a step slider (log_artifact's
        files have none). Synchronous, so nothing is left queued when the process ends."""
        def do():
            from PIL import Image
            source = io.BytesIO(png) if isinstance(png, (bytes, bytearray)) else png
            with Image.open(source) as im:
                im.load()
                self._client.log_image(self.run_id, im, key=key, step=int(step), synchronous=True)
        self._safely(f"log_image({key})", do)

    def set_tags(self, tags: dict[str, str]) -> None:
        def do():
            from mlflow.entities import RunTag
            items = [RunTag(k, redact(str(v))[:MAX_TAG_VALUE]) for k, v in tags.items() if v is not None]
            for chunk in _chunks(items, PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=chunk)
        self._safely("set_tags", do)
