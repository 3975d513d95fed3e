"""Triton-interpreter tests of the fused kernels.

TRITON_INTERPRET=1 is read when a @triton.jit function is defined, so these tests cannot share
a process with code that imported echocare_dist.kernels normally. They are collected only when
the variable is set for the whole process:

    TRITON_INTERPRET=1 .venv/bin/pytest tests/kernels_interp -q

A plain `pytest` run skips this folder; tests/test_kernels_interpreter.py runs it in a fresh
subprocess with the variable set.
"""
import os
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETING:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _kernels_are_interpreted():
    from echocare_dist.kernels._triton_common import finalize_mean_kernel, is_interpreted
    if not is_interpreted(finalize_mean_kernel):
        pytest.fail("echocare_dist.kernels was imported before TRITON_INTERPRET=1 was set "
                    f"(first import in this process: {sys.modules['echocare_dist.kernels'].__file__})")
