"""Preemption signals must reach the trainer, not kill the fallback loader's worker processes.

Slurm signals every process of a job step (time limit, scancel): a DataLoader worker that dies on
SIGTERM would crash the rank before it writes its preemption checkpoint.
"""
from __future__ import annotations

import os
import signal
import time

import psutil

from data_fixtures import loader_config, take, write_shards
from echocare_dist.data import build_loader


def _ignored(pid: int) -> int:
    """The SigIgn mask of a process (bit n-1 = signal n ignored)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    return 0


def test_fallback_workers_survive_preemption_signals(tmp_path, ontology):
    root = tmp_path / "shards"
    write_shards(root, ontology, (24, 24))
    cfg = loader_config(root, "pil", "data.num_threads=2")
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}  # e.g. a resource tracker of earlier tests
    loader = build_loader(cfg, ontology, rank=0, world_size=1, device="cpu", run_dir=tmp_path / "run")
    try:
        first = take(loader, 1)
        workers = [p for p in me.children(recursive=True) if p.pid not in before]
        assert workers, "the fallback loader should run DataLoader worker processes"
        # A worker forked but still starting has not run its worker_init_fn yet (under load it
        # can lag the first batch): the trainer's handlers cover that window, this test has none.
        wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
        deadline = time.time() + 60
        while time.time() < deadline and not all(_ignored(w.pid) & wanted == wanted for w in workers):
            time.sleep(0.05)
        assert all(_ignored(w.pid) & wanted == wanted for w in workers), "workers never ignored the signals"
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
            os.kill(w.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        more = take(loader, 3)
        assert len(more) == 3 and more[0]["keys"] != first[0]["keys"]
    finally:
        loader.close()
