#!/usr/bin/env bash
# The test command (README, .ci/run): install (idempotent) then run the whole suite.
#   scripts/test.sh [--fast] [pytest args...]
# --fast: the developer loop, every test not marked `slow` (pytest.ini: multi-process, DeepSpeed,
# Slurm, MLflow server, end-to-end); under 3 minutes on 2 cores. CI runs the whole suite.
# The Slurm tests start a real single-node Slurm (they apt-get slurm-wlm + munge when missing,
# which needs root); the MLflow test starts a real `mlflow server` on 127.0.0.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/echocare/torch_extensions}"
export PYTHONUNBUFFERED=1
# One ninja for every process (see tests/conftest.py): the venv's.
export PATH="$ROOT/.venv/bin:$PATH"
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
set +e
.venv/bin/python -m pytest -p no:cacheprovider --timeout=1200 --durations=25 ${args[@]+"${args[@]}"}
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected" >&2
    exit 1
fi
exit "$rc"
