#!/usr/bin/env bash
# EchoCare pretraining on Slurm: one task per GPU through srun, any number of nodes,
# preemption-safe (checkpoint -> requeue -> automatic resume). docs/cluster.md has the how-to.
#
#   sbatch slurm/pretrain.sh --config echocare_swin_l --set data.shards=/lustre/echocare/shards
#   sbatch --nodes=8 --time=2-00:00:00 slurm/pretrain.sh --config echocare_swin_l --set train.run_dir=/lustre/runs/swin_l
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/pretrain.sh --config tiny_cpu --set data.shards=DIR
#
# Arguments are the trainer's: --config PRESET_OR_YAML and any number of --set key=value.
# Submit from the repository root (or set ECHOCARE_ROOT): Slurm runs a copy of this file, so
# the repository is found through the submit directory, not through this script's path.
#
# The #SBATCH lines are defaults; options given to sbatch on the command line override them.
#   nodes / ntasks-per-node / gpus-per-node: one task per GPU (8-GPU nodes here); the world size
#     is nodes x ntasks-per-node.
#   cpus-per-task: DALI's CPU threads and the host side of each rank (~ cores per GPU).
#   signal=B:USR1@600: Slurm sends USR1 to this batch shell 600 s before the time limit; the
#     shell forwards it to every rank, the trainer checkpoints at the next step and exits with
#     train.requeue_exit_code (124), and this script requeues the job. Slurm checks the limit
#     only every ~30-60 s, so the lead must cover that plus one step plus a checkpoint write.
#   requeue: the job may be requeued (by this script, or by Slurm on node failure/preemption).
#   open-mode=append: a requeued run appends to the same log instead of truncating it.
#   output: relative to the submit directory; Slurm does not create missing directories.
#
#SBATCH --job-name=echocare-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Environment knobs (all optional):
#   ECHOCARE_ROOT           repository root (default: the sbatch submit directory)
#   ECHOCARE_VENV           virtual environment to activate (default: $ECHOCARE_ROOT/.venv if present;
#                           not used with a container)
#   ECHOCARE_CONTAINER      container image for Pyxis/Enroot: srun --container-image=...; the image's
#                           own code (/opt/echocare) and venv are used, not the checkout's
#   ECHOCARE_CONTAINER_MOUNTS  srun --container-mounts (data and run directories!), e.g. /lustre:/lustre
#   ECHOCARE_CONTAINER_WORKDIR directory inside the container (default /opt/echocare)
#   ECHOCARE_TASK_PREFIX    words put before each task's command, e.g. "apptainer exec --nv img.sif":
#                           the checkout's code runs with the container's python
#   ECHOCARE_PYTHON         interpreter for the tasks (default: the venv's, or python3; in a
#                           container: python from the image's PATH)
#   ECHOCARE_ENTRY          training entry point, absolute or relative to the code directory
#                           (default launch/pretrain.py)
#   ECHOCARE_DEVICE         cuda | cpu | auto (gpu = cuda; default: cuda when Slurm allocated GPUs to the
#                           job, else cpu). Exported to every rank, where it stands in for train.device=auto:
#                           with cuda, a rank that cannot use CUDA stops in its pre-flight (exit 2) instead
#                           of training on the CPU
#   ECHOCARE_MASTER_PORT    rendezvous port (default: derived from the job id)
#   ECHOCARE_REQUEUE_CODE   trainer exit code that means "checkpointed, requeue me" (default 124,
#                           keep equal to train.requeue_exit_code)
#   ECHOCARE_MAX_RESTARTS   give up requeueing after this many restarts (default 100)
#   ECHOCARE_TASK_EXIT_WAIT seconds the other ranks get once one rank has exited before srun kills
#                           them (default 120): a crashed rank cannot leave the rest hanging in a
#                           collective, while ranks leaving after a shared checkpoint all exit cleanly
set -euo pipefail

say() { echo "[pretrain.sh $(date '+%F %T')] $*"; }
die() { say "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch slurm/pretrain.sh --config ...'"
case " $* " in
    *" --config "*|*" --config="*|*" -c "*) ;;
    *) die "missing --config PRESET (arguments: ${*:-none}); e.g. sbatch slurm/pretrain.sh --config echocare_swin_l --set data.shards=DIR" ;;
esac

ROOT="${ECHOCARE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
ENTRY="${ECHOCARE_ENTRY:-launch/pretrain.py}"
REQUEUE_CODE="${ECHOCARE_REQUEUE_CODE:-124}"
MAX_RESTARTS="${ECHOCARE_MAX_RESTARTS:-100}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"

# --label prefixes every output line with its rank.
srun_args=(--label --kill-on-bad-exit=0 "--wait=${ECHOCARE_TASK_EXIT_WAIT:-120}"
           "--ntasks=${SLURM_NTASKS}" "--cpus-per-task=${SLURM_CPUS_PER_TASK:-1}")
prefix=()
if [ -n "${ECHOCARE_TASK_PREFIX:-}" ]; then read -r -a prefix <<<"$ECHOCARE_TASK_PREFIX"; fi
if [ -n "${ECHOCARE_CONTAINER:-}" ]; then
    # Pyxis: the image's code and venv (its ENV puts /opt/venv/bin first on PATH).
    workdir="${ECHOCARE_CONTAINER_WORKDIR:-/opt/echocare}"
    srun_args+=("--container-image=$ECHOCARE_CONTAINER" "--container-workdir=$workdir")
    if [ -n "${ECHOCARE_CONTAINER_MOUNTS:-}" ]; then
        srun_args+=("--container-mounts=$ECHOCARE_CONTAINER_MOUNTS")
    fi
    python="${ECHOCARE_PYTHON:-python}"
else
    case "$ENTRY" in /*) entry_path="$ENTRY" ;; *) entry_path="$ROOT/$ENTRY" ;; esac
    [ -f "$entry_path" ] || die "$entry_path not found: submit from the repository root or set ECHOCARE_ROOT"
    workdir="$ROOT"
    srun_args+=("--chdir=$workdir")
    if [ "${#prefix[@]}" -gt 0 ]; then
        # A wrapper such as `apptainer exec` brings its own environment: the image's python.
        python="${ECHOCARE_PYTHON:-python}"
    else
        venv="${ECHOCARE_VENV:-$ROOT/.venv}"
        if [ -f "$venv/bin/activate" ]; then
            # Activation also puts the venv's ninja on PATH: DeepSpeed JIT-builds ops with it.
            # shellcheck source=/dev/null
            source "$venv/bin/activate"
        elif [ -n "${ECHOCARE_VENV:-}" ]; then
            die "ECHOCARE_VENV=$ECHOCARE_VENV has no bin/activate"
        fi
        python="${ECHOCARE_PYTHON:-$(command -v python || command -v python3)}"
    fi
fi

# Rendezvous: the first node of the allocation, at the address Slurm itself uses to reach it.
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
node_addr="$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)"
export MASTER_ADDR="${node_addr:-$first_node}"
# Jobs sharing a node must not share a port; the id spreads them over 20000-59999.
export MASTER_PORT="${ECHOCARE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}"
export WORLD_SIZE="$SLURM_NTASKS"

device="${ECHOCARE_DEVICE:-}"
if [ -z "$device" ]; then
    if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null || [ -n "${SLURM_JOB_GPUS:-}" ]; then device=cuda; else device=cpu; fi
fi
# The vocabulary of train.device (echocare_dist/devices.py); cuda:N fits one process, not srun's tasks.
case "$device" in
    gpu|GPU|cuda|CUDA) device=cuda ;;
    auto) ;;
    # A node's GPUs can be visible to a job that was not given them (no cgroup device limits).
    cpu) export CUDA_VISIBLE_DEVICES="" ;;
    *) die "ECHOCARE_DEVICE=$device: expected cuda, cpu or auto (gpu = cuda; cuda:N fits a single process, not srun tasks)" ;;
esac
# Read by every rank (train.device=auto defers to it): the choice made here reaches Python.
export ECHOCARE_DEVICE="$device"
# One rank per task: keep each rank's intra-op threads inside its own CPUs.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1

say "job $SLURM_JOB_ID restart $RESTARTS on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS task(s), device $device"
say "rendezvous $MASTER_ADDR:$MASTER_PORT; workdir $workdir; $python $ENTRY $*"

# Each task derives its torch.distributed identity from Slurm's (no ssh, no pdsh, no launcher).
# shellcheck disable=SC2016  # expanded by the task's shell, not here
task_env='export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" NODE_RANK="$SLURM_NODEID"
export LOCAL_WORLD_SIZE="${SLURM_STEP_TASKS_PER_NODE%%[(,]*}"
echo "task rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE node $NODE_RANK ($(hostname))"
exec "$@"'

preempted=""
terminated=""
srun_pid=""
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
    preempted="$1"
    if [ "$1" = TERM ]; then terminated=1; fi
    say "received SIG$1: forwarding it to the training step"
    # srun relays the signal to every task on every node.
    if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# In the background: bash runs a trap only when `wait` returns, never during a foreground child.
# ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error before bash 4.4.
srun "${srun_args[@]}" ${prefix[@]+"${prefix[@]}"} bash -c "$task_env" echocare-task "$python" "$ENTRY" "$@" &
srun_pid=$!
if [ -n "$preempted" ]; then kill -s "$preempted" "$srun_pid" 2>/dev/null || true; fi

# A trapped signal makes `wait` return early (status > 128) while srun still runs: wait again
# until srun is gone; bash keeps a reaped background job's status for the final `wait`.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
wait "$srun_pid" && status=0 || status=$?

if [ "$status" -eq "$REQUEUE_CODE" ]; then
    if [ -n "$terminated" ]; then
        # SIGTERM means Slurm is ending the job: scancel, the time limit, or a preemption that
        # Slurm requeues itself. Requeueing here would resurrect a job its owner cancelled.
        say "trainer checkpointed (exit $status) after SIGTERM: the job is ending, not requeueing"
        exit "$status"
    fi
    if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
        say "trainer checkpointed (exit $status) but the job already restarted $RESTARTS times (ECHOCARE_MAX_RESTARTS): not requeueing"
        exit "$status"
    fi
    say "trainer checkpointed and exited $status${preempted:+ after SIG$preempted}: requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        say "requeued: the next run resumes from the latest checkpoint"
        exit 0
    fi
    # Cancelled jobs and jobs past their end cannot be requeued; the checkpoint is on disk.
    say "scontrol requeue failed: resubmit to resume from the latest checkpoint"
fi
if [ "$status" -ne 0 ] && [ "$status" -ne 2 ] && [ "$status" -ne 3 ]; then
    # 2 (bad input) and 3 (non-finite) carry their own message; anything else is a crash or a lost
    # rank. The checkpoint pointer moves only after a complete save, so it is safe to resume from.
    say "error: training failed with exit code $status on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST]: a rank" \
        "or a node failed (the first error is in the ranks' output above; srun names a task killed by a" \
        "signal). checkpoints/latest is the last complete checkpoint: resubmit the same command to resume," \
        "on fewer nodes too" >&2
fi
say "training step finished with exit code $status"
exit "$status"
