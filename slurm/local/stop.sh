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

[ -d "$STATE/run" ] || { log "nothing to stop in $STATE"; exit 0; }

# pid of a live process named $2 from pid file $1, or nothing
daemon_pid() {
    local file="$1" name="$2" pid
    [ -f "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 0
    [ "$(cat "/proc/$pid/comm")" = "$name" ] && echo "$pid"
}

stop_daemon() {
    local file="$1" name="$2" pid
    pid="$(daemon_pid "$file" "$name")"
    if [ -z "$pid" ]; then rm -f "$file"; return 0; fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
    log "stopped $name ($pid)"
}

if [ -n "$(daemon_pid "$STATE/run/slurmctld.pid" slurmctld)" ] && [ -f "$SLURM_CONF" ]; then
    jobs="$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null
        for _ in $(seq 30); do
            [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
            sleep 1
        done
    fi
fi

stop_daemon "$STATE/run/slurmd.pid" slurmd
stop_daemon "$STATE/run/slurmctld.pid" slurmctld
stop_daemon "$STATE/run/munged.pid" munged
exit 0
