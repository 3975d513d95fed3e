# Shared by start.sh / stop.sh / start-multinode.sh / stop-multinode.sh (sourced, not run).
# The caller defines log() and STATE first.
# shellcheck shell=bash

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
