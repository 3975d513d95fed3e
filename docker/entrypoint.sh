#!/usr/bin/env bash
# Container entry point (docker/Dockerfile). The first argument picks what runs:
#   pretrain ARGS...   deepspeed launch/pretrain.py ARGS... on this machine's GPUs
#                      (ECHOCARE_NPROC ranks, default: every visible GPU; DEEPSPEED_ARGS adds
#                      launcher options, e.g. "--master_port 29600")
#   echocare ARGS...   the echocare CLI (synth, shards, export, finetune, config, ...)
#   help               this text
#   anything else      run as a command (bash, python, nvidia-smi, ...)
# Multi-node runs do not go through here: slurm/pretrain.sh starts one task per GPU with srun
# (Pyxis / Apptainer), see docs/cluster.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

cmd="${1:-help}"
if [ "$#" -gt 0 ]; then shift; fi
case "$cmd" in
    pretrain)
        launcher=()
        if [ -n "${DEEPSPEED_ARGS:-}" ]; then read -r -a launcher <<<"$DEEPSPEED_ARGS"; fi
        # Without --num_gpus the DeepSpeed launcher starts one rank per visible GPU (one on CPU).
        if [ -n "${ECHOCARE_NPROC:-}" ]; then launcher+=(--num_gpus "$ECHOCARE_NPROC"); fi
        exec deepspeed "${launcher[@]}" "$ROOT/launch/pretrain.py" "$@"
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
