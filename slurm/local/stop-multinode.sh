#!/usr/bin/env bash
# Stop the cluster that slurm/local/start-multinode.sh started in STATE_DIR, and remove its
# network (namespaces, veth pairs, bridge, /etc/netns entries) as recorded in STATE_DIR/network.
#   slurm/local/stop-multinode.sh [STATE_DIR]   (default: $ECHOCARE_SLURM_DIR or /tmp/echocare-slurm-multi)
# Jobs are cancelled through Slurm first; daemons are stopped by their PID files only (a PID whose
# process is not the expected daemon is left alone). Idempotent.
set -uo pipefail

STATE="${1:-${ECHOCARE_SLURM_DIR:-/tmp/echocare-slurm-multi}}"
export PATH="/usr/sbin:/sbin:$PATH"
export SLURM_CONF="$STATE/slurm.conf"
log() { echo "[slurm-multinode] $*" >&2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
. "$HERE/common.sh"

[ -d "$STATE/run" ] || [ -f "$STATE/network" ] || { log "nothing to stop in $STATE"; exit 0; }

cancel_jobs

for file in "$STATE"/run/slurmd-*.pid; do
    [ -e "$file" ] && stop_daemon "$file" slurmd
done
stop_daemon "$STATE/run/slurmctld.pid" slurmctld
stop_daemon "$STATE/run/munged.pid" munged

if [ -f "$STATE/network" ]; then
    while IFS='=' read -r kind name; do
        case "$kind" in
            NETNS)
                # Deleting a namespace also deletes its end of the veth pair, and with it the host end.
                if ip netns list | grep -qw -- "$name"; then ip netns delete "$name" && log "removed namespace $name"; fi
                rm -rf "/etc/netns/${name:?}"
                ;;
            BRIDGE)
                bridge="$name"
                ;;
        esac
    done <"$STATE/network"
    if [ -n "${bridge:-}" ] && ip link show "$bridge" >/dev/null 2>&1; then
        ip link delete "$bridge" && log "removed bridge $bridge"
    fi
    rm -f "$STATE/network" "$STATE/nodes"
    rmdir /etc/netns 2>/dev/null || true  # only when no other namespace has files there
fi
exit 0
