#!/usr/bin/env bash
# A real single-node Slurm cluster (slurmctld + slurmd + munged) for tests and laptops,
# without systemd: Debian's slurm-wlm and munge, every file under one state directory.
#
#   sudo slurm/local/start.sh [STATE_DIR]     (default: $ECHOCARE_SLURM_DIR or /tmp/echocare-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf     (the last line printed says exactly this)
#   sbatch ... ; squeue ; scontrol show job ...
#   sudo slurm/local/stop.sh [STATE_DIR]
#
# Environment: ECHOCARE_SLURM_PORT (slurmctld port, slurmd uses the next one; default 6817),
# ECHOCARE_SLURM_CPUS (default: nproc), ECHOCARE_SLURM_TIMEOUT (seconds to wait for an idle
# node, default 90). Installs slurm-wlm + munge with apt-get when they are missing.
# Idempotent: a healthy cluster in STATE_DIR is left running; a half-dead one is stopped (by
# its PID files) and started again. On failure the daemons' logs are printed.
# Exit codes: 0 up, 1 failed to start, 3 slurm-wlm/munge missing and not installable.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${1:-${ECHOCARE_SLURM_DIR:-/tmp/echocare-slurm}}"
log() { echo "[slurm-local] $*" >&2; }
# shellcheck source=SCRIPTDIR/common.sh
. "$HERE/common.sh"
cluster_settings
# The node talks to itself over loopback: the host name need not resolve.
ADDR=127.0.0.1

die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd launches jobs as their owner; munged runs as user munge)"

install_packages() {
    # Exit code 3 = the packages cannot be had here (callers such as the tests skip on it).
    command -v apt-get >/dev/null || { log "error: slurm-wlm/munge are missing and apt-get is not available"; exit 3; }
    log "installing slurm-wlm and munge with apt-get"
    # Keep the packages' init scripts from starting system-wide daemons: we start our own.
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null; } || rc=$?
    if [ "$created" -eq 1 ]; then rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || { log "error: apt-get install slurm-wlm munge failed (exit $rc)"; exit 3; }
}

missing=0
for bin in slurmctld slurmd munged sbatch scontrol sinfo; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || missing=1
done
if [ "$missing" -eq 1 ]; then install_packages; fi
# start-multinode.sh reuses the installation above and nothing else.
if [ -n "${ECHOCARE_SLURM_INSTALL_ONLY:-}" ]; then exit 0; fi
export PATH="/usr/sbin:/sbin:$PATH"
command -v runuser >/dev/null || die "runuser (util-linux) is required to start munged as user munge"
id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed?)"

export SLURM_CONF="$STATE/slurm.conf"

node_state() { sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1; }

if pid_alive "$STATE/run/munged.pid" && pid_alive "$STATE/run/slurmctld.pid" && pid_alive "$STATE/run/slurmd.pid" \
        && [ -n "$(node_state)" ]; then
    log "already running in $STATE (node $HOST: $(node_state))"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi
if [ -d "$STATE/run" ]; then
    log "a previous cluster in $STATE is not healthy: stopping it by its PID files"
    "$HERE/stop.sh" "$STATE" || true
fi

prepare_state

# RealMemory must not exceed what slurmd measures, or the node is drained as invalid.
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))
sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@ADDR@|$ADDR|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$mem_mb|g" \
    "$HERE/slurm.conf.in" >"$SLURM_CONF.tmp"
mv -f "$SLURM_CONF.tmp" "$SLURM_CONF"

fail() { log "error: $*"; print_logs 40; "$HERE/stop.sh" "$STATE" >&2 || true; exit 1; }

start_munged

log "starting slurmctld and slurmd (node $HOST, $CPUS CPUs, ${mem_mb} MB, ports $CTLD_PORT/$SLURMD_PORT)"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
slurmd -f "$SLURM_CONF" -N "$HOST" || fail "slurmd did not start"

deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(node_state)"
    case "$state" in
        idle) break ;;
        down*|drain*|inval*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    pid_alive "$STATE/run/slurmctld.pid" || fail "slurmctld exited"
    pid_alive "$STATE/run/slurmd.pid" || fail "slurmd exited"
    sleep 1
done
[ "$state" = idle ] || fail "node $HOST is not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
log "cluster up in $STATE (node $HOST idle)"
echo "export SLURM_CONF=$SLURM_CONF"
