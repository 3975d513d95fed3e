"""Ahead-of-time compilation of every Triton kernel variant for sm_80 (A100) and sm_90 (H100),
without a GPU: a kernel that would not compile on the cluster, or that spills registers there,
fails CI here."""
import json
import os
import subprocess
import sys

import pytest

from echocare_dist.kernels.aot import parse_ptxas_log, spill_free

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
    # ...and the forward that also writes per-mask-patch sums (hard patch mining) at every preset's mask patch.
    assert {r["constexprs"]["SUM_PATCH"] for r in fwd} >= {0, 16, 32}
    assert {r["signature"]["pred_ptr"] for r in fwd} == {"*fp32", "*bf16", "*fp16"}
    assert {r["signature"]["z_ptr"] for r in records if r["kernel"] == "_hier_fwd_kernel"} == {"*fp32", "*bf16", "*fp16"}
    # Spill gate: every variant of every preset x dtype x arch fits in registers (sm_80 / sm_90:
    # at most 255 per thread), with its registers and shared memory reported.
    spills = [f"{r['arch']} {r['kernel']} w{r['num_warps']}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B "
              f"[{r['example']}]" for r in records if not spill_free(r)]
    assert not spills, "\n".join(spills)
    for r in records:
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] == 0 and r["shared_bytes"] >= 0, r
    assert "0 with register spills" in out.stdout


# ptxas -v output of the hierarchical forward before the fix (4 warps, sm_90a, bf16).
SPILLING_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_hier_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _hier_fwd_kernel
    216 bytes stack frame, 236 bytes spill stores, 264 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 216 bytes cumulative stack size
"""


def test_ptxas_log_parsing_and_spill_verdict():
    usage = parse_ptxas_log(SPILLING_LOG)
    assert usage == dict(registers=255, stack_bytes=216, spill_store_bytes=236, spill_load_bytes=264)
    assert not spill_free(usage)
    clean = SPILLING_LOG.replace("216 bytes stack frame, 236 bytes spill stores, 264 bytes spill loads",
                                 "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert spill_free(parse_ptxas_log(clean))
    assert not spill_free({})  # no figures is not a pass
    with pytest.raises(ValueError, match="registers"):
        parse_ptxas_log("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n")
