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
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
            os.kill(w.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        more = take(loader, 3)
        assert len(more) == 3 and more[0]["keys"] != first[0]["keys"]
    finally:
        loader.close()
