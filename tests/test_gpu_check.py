"""scripts/gpu_check.sh (benchmarks/gpu_check*.py): the GPU acceptance check. Here, without CUDA,
it must say so, check that it would start, and write its files; its pieces run on the CPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from echocare_dist.hardware import HBM_GBPS, PEAK_TFLOPS

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCH))  # appended: its module names (kernels, hardware) must not shadow others
import gpu_check  # noqa: E402 - benchmarks/ is not a package


@pytest.mark.slow
def test_no_cuda_verdict_and_files(repo_root, tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(repo_root / "scripts" / "gpu_check.sh"), "--out", str(out)], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NO CUDA: nothing was measured. The check WOULD start" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"versions.json", "versions.md", "preflight.json", "preflight.md",
                                                "summary.md"}
    versions = json.loads((out / "versions.json").read_text())
    assert versions["cuda_available"] is False and versions["torch"].startswith("2.")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    pre = json.loads((out / "preflight.json").read_text())
    assert pre["would_start"] is True and pre["cuda"] is False
    assert [c["check"] for c in pre["checks"]] == ["sections resolve", "imports", "config presets",
                                                   "kernels compile AOT for sm_90"]
    assert all(c["ok"] for c in pre["checks"]), pre["checks"]
    assert "none spills" in pre["checks"][3]["detail"]
    assert "NO CUDA" in (out / "summary.md").read_text()


def test_only_selects_and_orders_sections(tmp_path):
    assert gpu_check.parse_args(["--out", str(tmp_path), "--only", "decode,kernels"]).sections == ["kernels", "decode"]
    assert gpu_check.parse_args(["--out", str(tmp_path)]).sections == list(gpu_check.SECTIONS)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), "--only", "kernels,bogus"])


@pytest.mark.slow
def test_preflight_reports_a_failing_check(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pre = gpu_check.preflight(["kernels"])
    aot = next(c for c in pre["checks"] if c["check"] == "kernels compile AOT for sm_90")
    assert not aot["ok"] and "TRITON_INTERPRET" in aot["detail"] and pre["would_start"] is False


def test_bootstrap_appends_carried_wheels(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "carried_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("carried_probe/__init__.py", "VALUE = 7\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(gpu_check.SITE_ENV, str(tmp_path / "site"))
    site = gpu_check.bootstrap(wheels)
    assert site == tmp_path / "site" and sys.path[-1] == str(site)  # appended: the machine's packages win
    import carried_probe
    assert carried_probe.VALUE == 7 and Path(carried_probe.__file__).is_relative_to(site)
    sys.modules.pop("carried_probe")


def test_every_peak_table_device_has_an_hbm_bandwidth():
    assert set(HBM_GBPS) == set(PEAK_TFLOPS)
    assert HBM_GBPS["H200 SXM"] > HBM_GBPS["H100 SXM"] > HBM_GBPS["A100"] > 0


@pytest.mark.slow  # imports DeepSpeed / DALI: seconds on a busy machine
def test_decode_paths_run_on_cpu():
    import gpu_check_sections as sections
    blobs = sections._jpegs(16)
    img_s, label = sections._decode_torchvision(blobs, 8, device="cpu")
    assert img_s > 0 and "STAND-IN" in label
    img_s, label = sections._decode_dali(blobs, 8, device="cpu")
    assert img_s > 0 and "decoders.image(device='cpu')" in label


@pytest.mark.slow  # imports DeepSpeed / DALI: seconds on a busy machine
def test_train_section_skips_what_the_budget_cannot_fit():
    import gpu_check_train
    ctx = dict(deadline=time.monotonic() + gpu_check_train.MIN_SECONDS_LEFT - 5, targets=gpu_check.TARGETS)
    data, md = gpu_check_train.train_section(ctx, steps=30, warmup=5)
    names = [f"{p} compile={m}" for p in gpu_check_train.PRESETS for m in ("none",)]
    assert [r["name"] for r in data["rows"]][:2] == names  # eager p4 and p2 come first
    assert all(r["skipped"].startswith("budget:") for r in data["rows"]) and len(data["rows"]) >= 2
    assert md.count("budget:") == len(data["rows"]) and data["path"] in ("deepspeed", "fallback")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fallback", "auto"])
def test_train_worker_on_cpu(tmp_path, path):
    """The worker the train section starts per configuration, on the tiny preset: the fallback
    (plain torch) and the DeepSpeed path (echocare_dist.train.step) both train and report."""
    import gpu_check_train
    from echocare_dist.config import load_config
    from echocare_dist.data.testing import write_shards
    from echocare_dist.ontology import load_ontology

    cfg = load_config("tiny_cpu")
    write_shards(tmp_path / "shards", load_ontology(cfg.resolve_path(cfg.ontology.path)), counts=(8,) * 4,
                 size=(80, 64), pattern="ultrasound", distinct_images=8)
    spec = dict(preset="tiny_cpu", steps=2, warmup=1, result=str(tmp_path / "row.json"), device="cpu", path=path,
                overrides=gpu_check_train.overrides(tmp_path / "shards", tmp_path / "run", 3, "none", device="cpu")
                + ["data.num_threads=0"])
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path),
                           "--train-worker", json.dumps(spec)], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["path"] == ("fallback" if path == "fallback" else "deepspeed")
    assert ("FALLBACK" in row["path_label"]) == (path == "fallback")
    assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1 and math.isfinite(row["loss"]) and row["loss"] > 0
    assert 0 <= row["data_wait_s"] <= row["step_s"] and row["model_images_per_s"] >= row["images_per_s"]
    assert row["batch"] == cfg.train.micro_batch * cfg.train.grad_accum and row["compile"] == "none"
