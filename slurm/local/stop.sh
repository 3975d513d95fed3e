#!/usr/bin/env bash
# Stop the single-node cluster that slurm/local/start.sh started in STATE_DIR.
#   slurm/local/stop.sh [STATE_DIR]   (default: $ECHOCARE_SLURM_DIR or /tmp/echocare-slurm)
# Cancels the cluster's jobs through Slurm (their slurmstepd processes are not ours to kill),
# then stops slurmd, slurmctld and munged by their PID files only, never by process name.
# A PID whose process is not the expected daemon (PID reuse) is left alone. Idempotent.
set -uo pipefail

STATE="${1:-${ECHOCARE_SLURM_DIR:-/tmp/echocare-slurm}}"
export PATH="/usr/sbin:/sbin:$PATH"
export SLURM_CONF="$STATE/slurm.conf"
log() { echo "[slurm-local] $*" >&2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
. "$HERE/common.sh"

[ -d "$STATE/run" ] || { log "nothing to stop in $STATE"; exit 0; }

cancel_jobs

stop_daemon "$STATE/run/slurmd.pid" slurmd
stop_daemon "$STATE/run/slurmctld.pid" slurmctld
stop_daemon "$STATE/run/munged.pid" munged
exit 0
