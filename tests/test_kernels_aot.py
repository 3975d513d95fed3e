"""Ahead-of-time compilation of every Triton kernel variant for sm_80 (A100) and sm_90 (H100),
without a GPU: a kernel that would not compile on the cluster fails CI here."""
import json
import os
import subprocess
import sys

import pytest

KERNELS = {"_masked_l1_fwd_kernel", "_masked_l1_bwd_kernel", "finalize_mean_kernel",
           "_hier_fwd_kernel", "_hier_bwd_kernel", "_coherent_probs_kernel"}


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(repo_root, tmp_path):
    pytest.importorskip("triton")
    report = tmp_path / "aot.json"
    # A clean process: interpreted kernels (TRITON_INTERPRET=1) cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "echocare_dist.kernels.aot", "--arch", "80", "90",
                          "--workers", "2", "--json", str(report)],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    records = json.loads(report.read_text()) if report.exists() else []
    failed = [f"{r['arch']} {r['kernel']} [{r['example']}]: {r.get('error')}" for r in records if not r["ok"]]
    assert out.returncode == 0 and not failed, "\n".join(failed) or out.stderr[-4000:]
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in records if r["arch"] == arch} == KERNELS
    # Both patch sizes of the presets and all three float dtypes are among the compiled variants.
    fwd = [r for r in records if r["kernel"] == "_masked_l1_fwd_kernel"]
    assert {r["constexprs"]["PATCH"] for r in fwd} >= {2, 4}
    assert {r["signature"]["pred_ptr"] for r in fwd} == {"*fp32", "*bf16", "*fp16"}
    assert {r["signature"]["z_ptr"] for r in records if r["kernel"] == "_hier_fwd_kernel"} == {"*fp32", "*bf16", "*fp16"}
