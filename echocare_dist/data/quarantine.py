"""Damaged shards and samples: the run's record of them (`Quarantine`, shared by every rank of one
run directory) and what a loader does about them (`QuarantinePolicy`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_write_json
from .shards import DataLoaderError, ShardSet

log = logging.getLogger(__name__)

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


class QuarantinePolicy:
    """One rank's view of the damage: which shards an epoch leaves out, which samples a reader skips,
    the bad-sample counter, and the data.max_quarantine_fraction limit.

    Entries of quarantine.json count only for the shard directory they were recorded for, so a run
    directory reused with other shards does not leave out shards of the same name."""

    def __init__(self, run_dir: str | os.PathLike | None, shard_set: ShardSet, *, rank: int, kind: str,
                 max_fraction: float):
        self.file = Quarantine(run_dir)
        self.shard_set = shard_set
        self.rank, self.kind, self.max_fraction = rank, kind, max_fraction
        self._dir = str(shard_set.root.resolve())
        self.runtime_shards: set[str] = set()   # shards this rank found damaged
        self.bad_keys: set[str] = set()          # "shard/key" of samples found damaged
        self.bad_samples = 0

    def _recorded(self, section: str) -> set[str]:
        entries = self.file.read()[section]
        return {name for name, info in entries.items() if info.get("dir", self._dir) == self._dir}

    def known_bad_samples(self) -> set[str]:
        """"shard/key" of every sample a reader must skip: found by this rank or recorded by any."""
        return self.bad_keys | self._recorded("samples")

    def shards_to_leave_out(self, epoch: int) -> set[str]:
        """The shards epoch `epoch` leaves out: those recorded so far, and those that fail the
        preflight now (recorded on the way)."""
        known = (self._recorded("shards") | self.runtime_shards) & set(self.shard_set.by_name)
        fresh = self.shard_set.preflight(s for s in self.shard_set.shards if s.name not in known)
        if fresh:
            self.record_shards({name: {"reason": reason} for name, reason in fresh.items()}, epoch)
        return known | set(fresh)

    def check_limit(self, excluded: Iterable[str]) -> None:
        n, total = len(set(excluded)), len(self.shard_set.shards)
        if n and n > self.max_fraction * total:
            where = self.file.path or "the log above"
            raise DataLoaderError(
                f"{n} of {total} shards in {self.shard_set.root} are damaged (data.max_quarantine_fraction="
                f"{self.max_fraction}): that looks systematic (storage, copy, driver); see {where}")

    def record_shards(self, found: dict[str, dict], epoch: int, *, count_as_bad_samples: bool = False) -> None:
        """Quarantine shards {name: {"reason": ..., optional "key": ...}} found damaged in `epoch`.
        `count_as_bad_samples`: the damage names no sample (a broken tar or index), so each shard
        counts once in `bad_samples`."""
        for name, info in found.items():
            log.warning("rank %d: quarantining shard %s/%s: %s%s", self.rank, self.shard_set.root, name,
                        info.get("reason"), f" (sample {info['key']})" if info.get("key") else "")
            info.update(dir=self._dir, rank=self.rank, epoch=epoch, loader=self.kind)
        if count_as_bad_samples:
            self.bad_samples += len(found)
        self.runtime_shards |= set(found)
        self.file.add(shards=found)

    def record_samples(self, bad: Iterable[tuple[str, str, str]], epoch: int) -> None:
        """Count and record damaged samples (shard name, key, reason); each is counted once."""
        new = {}
        for shard, key, reason in bad:
            tag = f"{shard}/{key}"
            if tag in self.bad_keys:
                continue
            self.bad_keys.add(tag)
            new[tag] = dict(shard=shard, key=key, reason=reason, dir=self._dir, rank=self.rank, epoch=epoch,
                            loader=self.kind)
            log.warning("rank %d: skipping damaged sample %s: %s", self.rank, tag, reason)
        if new:
            self.bad_samples += len(new)
            self.file.add(samples=new)

    def state(self) -> dict:
        return {"quarantined": sorted(self.runtime_shards), "bad_samples": self.bad_samples,
                "bad_keys": sorted(self.bad_keys)}

    def load_state(self, state: dict) -> None:
        self.bad_samples = int(state.get("bad_samples", 0))
        self.bad_keys = set(state.get("bad_keys", []))
        self.runtime_shards |= set(state.get("quarantined", []))


@contextlib.contextmanager
def _locked(lock_path: Path):
    import fcntl
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
