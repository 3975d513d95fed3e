#!/usr/bin/env bash
# GPU acceptance check (benchmarks/gpu_check.py): kernels, real trainer step, GPU JPEG decode.
# Sized for a lent machine: at most ~5 minutes end to end (--budget-s), every section's JSON and
# markdown written to --out as it ends. Without CUDA it checks that it would start and exits 0.
#
#   bash scripts/gpu_check.sh --out DIR [--only kernels,train,decode] [--budget-s 300]
#
# On the lent machine (no network): prepare the wheels here with `bash scripts/gpu_wheels.sh`, then
# run tool, carry=[".gpu_wheels"], command `bash scripts/gpu_check.sh --out $OUT`, timeout_s 420.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=$(command -v python3 || command -v python)
fi
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/echocare/torch_extensions}
# A hard stop below the device tool's 10-minute command limit: a hang still leaves the finished
# sections' files in --out (each is written the moment its section ends).
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-540}" "$py" benchmarks/gpu_check.py "$@"
