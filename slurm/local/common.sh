# Shared by start.sh / stop.sh / start-multinode.sh / stop-multinode.sh (sourced, not run).
# The caller defines log() and STATE first (start_munged: also fail()).
# shellcheck shell=bash

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The settings both start scripts read from the environment (their headers document them).
# shellcheck disable=SC2034  # read by the sourcing script
cluster_settings() {
    CTLD_PORT="${ECHOCARE_SLURM_PORT:-6817}"
    SLURMD_PORT="$((CTLD_PORT + 1))"
    CPUS="${ECHOCARE_SLURM_CPUS:-$(nproc)}"
    TIMEOUT="${ECHOCARE_SLURM_TIMEOUT:-90}"
    HOST="$(hostname -s)"
}

# pid of a live process named $2 from pid file $1, or nothing
daemon_pid() {
    local file="$1" name="$2" pid
    [ -f "$file" ] || return 0
    pid="$(tr -dc '0-9' <"$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 0
    [ "$(cat "/proc/$pid/comm")" = "$name" ] && echo "$pid"
}

# SIGTERM the daemon of pid file $1 (process name $2), SIGKILL after 10 s, remove the pid file.
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
    log "stopped $name ($pid, $(basename "$file" .pid))"
}

# The state folders and munge's key, log and pid file, owned as munged demands.
prepare_state() {
    mkdir -p "$STATE"/{ctld,slurmd,run,log,munge}
    chmod 755 "$STATE" "$STATE/run" "$STATE/log"
    # munged wants its socket directory owned by munge, writable by nobody else, searchable by all.
    chown munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    touch "$STATE/log/munged.log" "$STATE/run/munged.pid"
    chown munge:munge "$STATE/log/munged.log" "$STATE/run/munged.pid"
}

# The last $1 lines of every daemon log in STATE, on stderr (after a failed start).
print_logs() {
    local f lines="$1"
    for f in "$STATE"/log/*.log; do
        [ -f "$f" ] || continue
        log "----- $f (last $lines lines) -----"
        tail -n "$lines" "$f" >&2
    done
}

# munged as user munge, its socket in STATE (reachable from every network namespace: a file).
start_munged() {
    log "starting munged"
    runuser -u munge -- munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --log-file="$STATE/log/munged.log" --pid-file="$STATE/run/munged.pid" \
        --seed-file="$STATE/munge/munged.seed" || fail "munged did not start"
    for _ in $(seq 50); do [ -S "$STATE/munge/munge.socket" ] && break; sleep 0.1; done
    [ -S "$STATE/munge/munge.socket" ] || fail "munged socket did not appear"
}

# Cancel the cluster's jobs through Slurm and wait up to 30 s for them to leave: their slurmstepd
# processes are not ours to kill. Only while slurmctld of STATE is alive and SLURM_CONF exists.
cancel_jobs() {
    local jobs
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
}
