#!/usr/bin/env bash
# The one install script: README, .ci/run and docker/Dockerfile all call it.
#   scripts/install.sh [VENV_DIR]      (default: .venv in the repository root)
# Creates the venv, installs torch/torchvision at the pinned versions first (so nothing later
# can drag in another torch), then this package with every extra, constrained by
# constraints.txt. Re-running is cheap: an up-to-date venv is left alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${ECHOCARE_VENV:-$ROOT/.venv}}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.echocare-install-stamp"
WANT="$(cat "$ROOT/constraints.txt" "$ROOT/setup.py" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import echocare_dist" 2>/dev/null; then
    echo "[install] $VENV is up to date"
    exit 0
fi

echo "[install] creating $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_NO_INPUT=1
"${PIP[@]}" install -q --upgrade "pip>=24" "setuptools>=70" wheel -c "$ROOT/constraints.txt"
# torch first and pinned; every later call is constrained by the same file.
"${PIP[@]}" install -q -c "$ROOT/constraints.txt" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" install -q -c "$ROOT/constraints.txt" -e "${ROOT}[dali,triton,server,test,dicom]"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, triton, deepspeed, webdataset, timm, mlflow, nvidia.dali, echocare_dist
print(f"[install] torch {torch.__version__}, triton {triton.__version__}, deepspeed {deepspeed.__version__}, "
      f"dali {nvidia.dali.__version__}, timm {timm.__version__}, mlflow {mlflow.__version__}")
PY
echo "$WANT" > "$STAMP"
