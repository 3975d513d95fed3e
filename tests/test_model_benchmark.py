"""benchmarks/train_step.py runs end to end (real deepspeed.initialize, ZeRO 0 and 3) on the tiny model."""
from __future__ import annotations

import json
import subprocess

import pytest


@pytest.mark.slow
def test_train_step_benchmark_tiny(repo_root, python_exe, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [python_exe, str(repo_root / "benchmarks" / "train_step.py"), "--base-config", "tiny_cpu",
         "--archs", "preset", "--patches", "4", "--zero", "0", "3", "--batch", "2", "--steps", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["patch"], r["zero"]) for r in rows] == [(4, 0), (4, 3)]
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] >= 0
    table = out.with_suffix(".md").read_text()
    assert "| preset | 4 | 3 | 2 |" in table and "hardware:" in table
