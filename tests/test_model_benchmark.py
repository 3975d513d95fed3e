"""benchmarks/train_step.py runs the real trainer step (build_components + train_step) end to end:
2 gloo ranks under torch.distributed.run, real shards through the loader, ZeRO 0 and 3."""
from __future__ import annotations

import json
import subprocess

import pytest


@pytest.mark.slow
def test_train_step_benchmark_tiny_two_ranks(repo_root, python_exe, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [python_exe, str(repo_root / "benchmarks" / "train_step.py"), "--presets", "tiny_cpu", "--nproc", "2",
         "--zero", "0", "3", "--batch", "2", "--warmup", "1", "--steps", "2", "--device", "cpu",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["preset"], r["ranks"], r["zero"], r["batch"], r["compile"]) for r in rows] == [
        ("tiny_cpu", 2, 0, 2, "none"), ("tiny_cpu", 2, 3, 2, "none")]  # compile=auto on the CPU: eager
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] >= 0
        assert 0 <= r["data_wait_s"] <= r["data_wait_max_s"] <= r["step_s"]  # waiting is part of the step
        assert r["gflop_fwd"] > 0 and r["peak_source"] == "measured CPU matmul"
        assert r["loss"] > 0 and r["device"] == "cpu"
    table = out.with_suffix(".md").read_text()
    assert "| tiny_cpu | tiny | 2 | 2 | 3 | none | 2 | 1 | fp32 |" in table and "hardware:" in table
    assert "build_components + train_step" in table


def test_compile_comparison_pairs_each_mode_with_eager(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    import train_step
    rows = [dict(preset="tiny_cpu", zero=2, compile="none", images_per_s=10.0),
            dict(preset="tiny_cpu", zero=2, compile="blocks", images_per_s=12.5),
            dict(preset="tiny_cpu", zero=3, compile="blocks", images_per_s=9.0)]  # no eager run: no line
    assert train_step.compile_comparison(rows) == [
        "tiny_cpu ZeRO-2: eager 10.00 img/s vs compile=blocks 12.50 img/s (1.25x)"]
