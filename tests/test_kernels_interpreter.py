"""Runs the Triton kernels in the interpreter (tests/kernels_interp) in a fresh process.

TRITON_INTERPRET=1 only takes effect for @triton.jit functions defined after it is set, and the
rest of the suite imports echocare_dist.kernels normally; a subprocess keeps both worlds apart
whatever order the tests run in.
"""
import os
import subprocess
import sys

import pytest

TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                    reason="TRITON_INTERPRET=1 is set: tests/kernels_interp is collected in this process")
def test_triton_kernels_in_interpreter(repo_root):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "tests/kernels_interp", "-q", "-x", "-p", "no:cacheprovider",
           f"--timeout={TIMEOUT_S}"]
    out = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 60)
    print(out.stdout[-4000:])
    assert out.returncode == 0, f"interpreter kernel tests failed:\n{out.stdout[-8000:]}\n{out.stderr[-4000:]}"
    assert " passed" in out.stdout
