"""System metrics of a tracked run (CPU, memory, disk, network; GPU utilisation and memory when
NVML sees a GPU), sampled by MLflow's own SystemMetricsMonitor in a daemon thread.

It works with mlflow-skinny + psutil (no full mlflow needed); the GPU monitor needs pynvml
(nvidia-ml-py, installed with the package) and a driver, and is skipped quietly without them.
Metrics arrive as `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
`system/gpu_0_utilization_percentage`, ... with the sample number as their step (the UI's
"System metrics" tab). Only the tracking process samples: rank 0's host in a multi-node run.
$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, overrides the interval (MLflow's rule).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class SystemMetrics:
    """start() / stop() around a run; never raises (a failed sampler must not stop training)."""

    def __init__(self, run_id: str, tracking_uri: str, interval_s: float, resumed: bool):
        self.run_id, self.uri, self.interval_s, self.resumed = run_id, tracking_uri, interval_s, resumed
        self._monitor = None

    def start(self) -> bool:
        if self.interval_s <= 0:
            return False
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a requeued run continues the sample numbering instead of overwriting it.
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s,
                                                 samples_before_logging=1, resume_logging=self.resumed,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - e.g. psutil missing in a trimmed image
            log.warning("MLflow system metrics are off: %s", exc)
            self._monitor = None
            return False
        gpu = any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in self._monitor.monitors)
        log.info("MLflow: system metrics every %.0f s (CPU, memory, disk, network%s)",
                 self._monitor.sampling_interval, ", GPU" if gpu else "; no GPU seen")
        return True

    def stop(self) -> None:
        """Wakes the sampler, joins it and flushes what it holds (bounded by one MLflow call)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow system metrics: stopping failed: %s", exc)
