"""The run's record of damaged shards and samples, shared by every rank of one run directory."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from ..atomic import atomic_write_json
from .shards import DataLoaderError

QUARANTINE = "quarantine.json"


# --------------------------------------------------------------------------------------------
class Quarantine:
    """`{run_dir}/quarantine.json`: damaged shards (left out from the next epoch on) and bad samples.

    Ranks share the run directory; each writes under an advisory lock, merging with what is on
    disk, and replaces the file atomically. Without a run directory the record stays in memory."""

    def __init__(self, run_dir: str | os.PathLike | None):
        self.path = Path(run_dir) / QUARANTINE if run_dir else None
        self._mem: dict = {"shards": {}, "samples": {}}

    def read(self) -> dict:
        data = {"shards": dict(self._mem["shards"]), "samples": dict(self._mem["samples"])}
        if self.path is not None and self.path.exists():
            try:
                disk = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DataLoaderError(f"cannot read {self.path}: {exc}; fix or remove it") from exc
            data["shards"].update(disk.get("shards", {}))
            data["samples"].update(disk.get("samples", {}))
        return data

    def shards(self) -> set[str]:
        return set(self.read()["shards"])

    def samples(self) -> set[str]:
        return set(self.read()["samples"])

    def add(self, *, shards: dict[str, dict] | None = None, samples: dict[str, dict] | None = None) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for d in (shards or {}).values():
            d.setdefault("time", stamp)
        for d in (samples or {}).values():
            d.setdefault("time", stamp)
        self._mem["shards"].update(shards or {})
        self._mem["samples"].update(samples or {})
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.parent / f".{QUARANTINE}.lock"):
            data = self.read()
            for key, value in (shards or {}).items():
                data["shards"].setdefault(key, value)
            for key, value in (samples or {}).items():
                data["samples"].setdefault(key, value)
            atomic_write_json(self.path, data)


@contextlib.contextmanager
def _locked(lock_path: Path):
    import fcntl
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
