#!/usr/bin/env bash
# Container entry point (docker/Dockerfile). The first argument picks what runs:
#   pretrain ARGS...   echocare pretrain --nproc N ARGS...: N local ranks (DeepSpeed ZeRO)
#                      (N = ECHOCARE_NPROC, default: every visible GPU, 1 without one);
#                      `docker stop` -> the ranks checkpoint and the container exits 124
#   echocare ARGS...   the echocare CLI (synth, shards, export, finetune, config, ...)
#   help               this text
#   anything else      run as a command (bash, python, nvidia-smi, ...)
# Multi-node runs do not go through here: slurm/pretrain.sh starts one task per GPU with srun
# (Pyxis / Apptainer), see docs/cluster.md.
set -euo pipefail

usage() { sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

# GPUs this container sees (docker --gpus / the NVIDIA runtime put nvidia-smi in); 1 without any.
visible_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 1; fi
}

# DeepSpeed's CPU op, prebuilt in the image (docker/Dockerfile): seed an empty
# TORCH_EXTENSIONS_DIR with it, timestamps kept so ninja finds it up to date.
seed_torch_extensions() {
    local prebuilt="${ECHOCARE_PREBUILT_EXTENSIONS:-/opt/echocare-torch-extensions}" dir="${TORCH_EXTENSIONS_DIR:-}"
    if [ -n "$dir" ] && [ -d "$prebuilt" ] && [ ! -e "$dir" ]; then
        mkdir -p "$(dirname "$dir")"
        cp -R --preserve=mode,timestamps "$prebuilt" "$dir"
    fi
}

cmd="${1:-help}"
if [ "$#" -gt 0 ]; then shift; fi
case "$cmd" in
    pretrain)
        # Our launcher, not DeepSpeed's: as PID 1 the `deepspeed` runner ignores the SIGTERM of
        # `docker stop` (it sets no handler) and its launch.py turns it into exit 1 after killing
        # the ranks; ours forwards it, the ranks checkpoint and the exit code is 124 (requeue).
        nproc="${ECHOCARE_NPROC:-$(visible_gpus)}"
        seed_torch_extensions
        exec echocare pretrain --nproc "$nproc" "$@"
        ;;
    echocare)
        exec echocare "$@"
        ;;
    help|-h|--help)
        usage
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac
