"""`echocare export` -> the pretraining run's MLflow run: the export directory as artifacts
(`export/`) and tags naming it (`echocare.export_sha256`, `.export_dir`, `.export_step`).

The run is found through the id the checkpoint recorded (encoder.json `source.mlflow_run_id`) in
the store the run's config names (tracking.uri, else $MLFLOW_TRACKING_URI, else the run
directory's own mlflow.db). The run is only attached to, never reopened: its status stays.
An export succeeds whether or not MLflow can be reached; what happened is logged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .redact import MASK
from .tracking import SQLITE_PREFIX, Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)


def _store_uri(cfg) -> str:
    uri = cfg.tracking.uri
    if MASK in uri:
        # The checkpoint keeps the config with credentials masked: the real URI can only come
        # from the environment now.
        log.info("tracking.uri of the run is stored redacted; using $MLFLOW_TRACKING_URI to log the export")
        return os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri


def log_export(meta: dict, out: Path, cfg, run_dir: Path | None) -> bool:
    """True when the export was logged to its pretraining run."""
    run_id = (meta.get("source") or {}).get("mlflow_run_id")
    if not run_id or not cfg.tracking.enabled:
        log.info("export not logged to MLflow: the run %s", "had tracking off" if run_id else "recorded no MLflow run id")
        return False
    uri = _store_uri(cfg)
    if not uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        if run_dir is None:
            log.info("export not logged to MLflow: no tracking URI and no run directory to find mlflow.db in")
            return False
        uri, _ = resolve_tracking_uri("", run_dir)
    if uri.startswith(SQLITE_PREFIX) and not Path(uri[len(SQLITE_PREFIX):]).is_file():
        # Opening a missing SQLite path would create an empty store: the run is simply not there.
        log.warning("export not logged to MLflow: %s does not exist", uri[len(SQLITE_PREFIX):])
        return False
    tracker = Tracker(True, uri, cfg.tracking.experiment, run_dir=run_dir or out)
    if not tracker.attach(run_id):
        return False
    encoder = meta["files"]["encoder"]
    tracker.set_tags({"echocare.export_sha256": encoder["sha256"], "echocare.export_dir": str(Path(out).resolve()),
                      "echocare.export_step": str((meta.get("source") or {}).get("step"))})
    tracker.log_artifacts(Path(out), "export")
    log.info("export logged to MLflow run %s at %s (artifacts export/)", run_id, tracker.shown_uri)
    return True
