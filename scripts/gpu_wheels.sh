#!/usr/bin/env bash
# Prepare .gpu_wheels/: what the lent GPU machine lacks for the DeepSpeed path of
# scripts/gpu_check.sh. That machine has Python 3.12, torch, Triton, timm, torchvision, Pillow,
# OpenCV, PyYAML, safetensors and psutil (with their own dependencies: numpy, packaging, tqdm,
# typing_extensions), but no DeepSpeed and no network. DeepSpeed's import needs hjson, msgpack,
# einops, py-cpuinfo and pydantic (+ pydantic-core, annotated-types, typing-inspection); msgpack
# and pydantic-core are compiled, so their wheels are fetched for that machine's CPython
# (GPU_PYTHON_VERSION, default 3.12, manylinux x86_64). DeepSpeed itself is an sdist on PyPI: its
# pure-Python wheel (no prebuilt ops: the trainer uses torch's AdamW) is built here.
# Versions are this venv's (constraints.txt), so the carried set is the one CI tests.
#
#   bash scripts/gpu_wheels.sh [OUT_DIR]        # default .gpu_wheels (git-ignored)
# then carry it: run tool with carry=[".gpu_wheels"], command `bash scripts/gpu_check.sh --out $OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-24}   # the carry limit is 64 MiB with the source tree

pin() { "$PY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }

tmp="$OUT.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation "$(pin deepspeed)" -w "$tmp"
pure=()
for p in hjson einops py-cpuinfo pydantic annotated-types typing-inspection; do pure+=("$(pin "$p")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "${pure[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$tmp" "$(pin pydantic-core)" "$(pin msgpack)"
size_mib=$(du -sm "$tmp" | cut -f1)
if [ "$size_mib" -gt "$LIMIT_MIB" ]; then
    echo "[gpu_wheels] $tmp is ${size_mib} MiB, over GPU_WHEELS_LIMIT_MIB=$LIMIT_MIB" >&2
    exit 1
fi
rm -rf "$OUT"
mv "$tmp" "$OUT"
echo "[gpu_wheels] $OUT (${size_mib} MiB, for CPython $PYVER):"
ls -1 "$OUT"
