#!/usr/bin/env bash
# A real multi-node Slurm cluster on ONE machine, to rehearse a multi-node job on a workstation:
# slurmctld + munged on the host, and N nodes, each a slurmd in its own network namespace (its
# own address, reached through a veth pair on a bridge) and UTS namespace (its own hostname).
# The shared filesystem is the host's. No systemd; every daemon is started and stopped by pid.
#
#   sudo slurm/local/start-multinode.sh [STATE_DIR] [NODES]   (defaults: $ECHOCARE_SLURM_DIR or
#                                                             /tmp/echocare-slurm-multi; 2 nodes)
#   export SLURM_CONF=STATE_DIR/slurm.conf     (the last line printed says exactly this)
#   sbatch --nodes 2 --ntasks-per-node 1 ... ; squeue ; scontrol show job ...
#   sudo slurm/local/stop-multinode.sh [STATE_DIR]
#
# Nodes are named node1..nodeN, at SUBNET.11, SUBNET.12, ...; the host (slurmctld) is SUBNET.1 on
# the bridge. Each node resolves every node's name through its own /etc/hosts
# (/etc/netns/NAMESPACE/hosts, bind-mounted over /etc/hosts in the node's mount namespace).
# Environment: ECHOCARE_SLURM_PORT (slurmctld port, slurmd uses the next; default 6817; also
# names the bridge, namespaces and subnet, so clusters with different ports coexist),
# ECHOCARE_SLURM_SUBNET (three octets, default 10.2XX.YYY derived from the port),
# ECHOCARE_SLURM_CPUS (CPUs per node, default: nproc), ECHOCARE_SLURM_TIMEOUT (seconds to wait
# for idle nodes, default 90). Needs root, iproute2 (ip netns, veth, bridge) and util-linux
# (unshare, runuser); installs slurm-wlm + munge through start.sh's rules when missing.
# Exit codes: 0 up, 1 failed to start (logs printed, everything stopped), 3 packages missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${1:-${ECHOCARE_SLURM_DIR:-/tmp/echocare-slurm-multi}}"
NODES="${2:-2}"
log() { echo "[slurm-multinode] $*" >&2; }
# shellcheck source=SCRIPTDIR/common.sh
. "$HERE/common.sh"
cluster_settings
SUBNET="${ECHOCARE_SLURM_SUBNET:-10.$((200 + CTLD_PORT / 256 % 50)).$((CTLD_PORT % 256))}"
CTLD_ADDR="$SUBNET.1"
BRIDGE="ecbr$CTLD_PORT"

die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, slurmd, munged as user munge)"
case "$NODES" in ''|*[!0-9]*) die "NODES=$NODES: expected a number of nodes (2 or more)" ;; esac
[ "$NODES" -ge 2 ] && [ "$NODES" -le 8 ] || die "NODES=$NODES: expected 2 to 8 nodes"
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "ECHOCARE_SLURM_SUBNET=$SUBNET: expected three octets such as 10.201.7"

if ! command -v slurmd >/dev/null && [ ! -x /usr/sbin/slurmd ]; then
    # start.sh owns the installation (and its exit code 3); with packages present it is not needed.
    log "slurm-wlm is missing: installing it through start.sh's rules"
    ECHOCARE_SLURM_INSTALL_ONLY=1 "$HERE/start.sh" "$STATE/.install" || exit $?
fi
export PATH="/usr/sbin:/sbin:$PATH"
for bin in slurmctld slurmd munged ip unshare runuser; do
    command -v "$bin" >/dev/null || { log "error: $bin is missing"; exit 3; }
done
id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed?)"

export SLURM_CONF="$STATE/slurm.conf"
node_name() { echo "node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
netns_name() { echo "echocare-$CTLD_PORT-node$1"; }

idle_nodes() { sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l; }

healthy() {
    local i
    pid_alive "$STATE/run/munged.pid" && pid_alive "$STATE/run/slurmctld.pid" || return 1
    for i in $(seq "$NODES"); do pid_alive "$STATE/run/slurmd-$(node_name "$i").pid" || return 1; done
    [ "$(idle_nodes)" -gt 0 ] || [ -n "$(squeue -h -o '%i' 2>/dev/null)" ]
}

if [ -f "$STATE/nodes" ] && healthy; then
    log "already running in $STATE ($(cat "$STATE/nodes"))"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi
if [ -d "$STATE/run" ]; then
    log "a previous cluster in $STATE is not healthy: stopping it by its PID files"
    "$HERE/stop-multinode.sh" "$STATE" || true
fi

fail() { log "error: $*"; print_logs 30; "$HERE/stop-multinode.sh" "$STATE" >&2 || true; exit 1; }

prepare_state

# What stop-multinode.sh must undo, written before anything is created.
{
    echo "BRIDGE=$BRIDGE"
    for i in $(seq "$NODES"); do echo "NETNS=$(netns_name "$i")"; done
} >"$STATE/network"

# ------------------------------------------------------------------ network
log "network: bridge $BRIDGE at $CTLD_ADDR/24, $NODES namespaces"
ip link add "$BRIDGE" type bridge 2>/dev/null || ip link show "$BRIDGE" >/dev/null 2>&1 || fail "cannot create bridge $BRIDGE"
ip addr replace "$CTLD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
hosts="127.0.0.1 localhost
$CTLD_ADDR $HOST"
for i in $(seq "$NODES"); do hosts="$hosts
$(node_addr "$i") $(node_name "$i")"; done
for i in $(seq "$NODES"); do
    ns="$(netns_name "$i")" veth="ecv${CTLD_PORT}n$i"
    ip netns add "$ns" || fail "cannot create network namespace $ns"
    ip link add "$veth" type veth peer name "${veth}p" || fail "cannot create veth $veth"
    ip link set "${veth}p" netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "${veth}p" name eth0
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$CTLD_ADDR"
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts" >"/etc/netns/$ns/hosts"
    # No DNS server is reachable from a node: a lookup that misses /etc/hosts must fail at once
    # (nothing listens on the node's own loopback), not after the host resolver's timeouts.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"/etc/netns/$ns/resolv.conf"
done

# ------------------------------------------------------------------ slurm.conf
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 / NODES ))
node_lines="" node_list=""
for i in $(seq "$NODES"); do
    node_lines="${node_lines}NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_name "$i") CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN\\n"
    node_list="${node_list:+$node_list,}$(node_name "$i")"
    mkdir -p "$STATE/slurmd/$(node_name "$i")"
done
sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@NODE_LINES@|${node_lines%\\n}|" -e "s|@NODES@|$node_list|g" \
    "$HERE/multinode.conf.in" >"$SLURM_CONF.tmp"
mv -f "$SLURM_CONF.tmp" "$SLURM_CONF"

# ------------------------------------------------------------------ daemons
start_munged

log "starting slurmctld on $HOST ($CTLD_ADDR:$CTLD_PORT)"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
for i in $(seq "$NODES"); do
    name="$(node_name "$i")"
    log "starting slurmd $name at $(node_addr "$i") in namespace $(netns_name "$i")"
    # The munge socket is a file: reachable from every network namespace. The hostname is set in
    # a UTS namespace of the node's own, so jobs see `hostname` = their node; a mount namespace of
    # its own carries the node's /etc/hosts (and lets a test give one node a different view of a
    # path). nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts slurmd reads.
    # shellcheck disable=SC2016  # expanded by the node's shell, from its arguments
    nsenter --net="/run/netns/$(netns_name "$i")" unshare --uts --mount --propagation slave sh -c \
        'mount --bind "$3/hosts" /etc/hosts && mount --bind "$3/resolv.conf" /etc/resolv.conf &&
         hostname "$1" && exec slurmd -f "$2" -N "$1"' \
        slurmd-start "$name" "$SLURM_CONF" "/etc/netns/$(netns_name "$i")" \
        || fail "slurmd $name did not start"
done

deadline=$((SECONDS + TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
    [ "$(idle_nodes)" -ge "$NODES" ] && break
    for i in $(seq "$NODES"); do
        name="$(node_name "$i")"
        case "$(sinfo -h -n "$name" -o '%t' 2>/dev/null)" in
            down*|drain*|inval*) scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        pid_alive "$STATE/run/slurmd-$name.pid" || fail "slurmd $name exited"
    done
    pid_alive "$STATE/run/slurmctld.pid" || fail "slurmctld exited"
    sleep 1
done
[ "$(idle_nodes)" -ge "$NODES" ] || fail "not all $NODES nodes are idle after ${TIMEOUT}s: $(sinfo -h -N -o '%N %t' | tr '\n' ' ')"
echo "$node_list" >"$STATE/nodes"
log "cluster up in $STATE: nodes $node_list idle"
echo "export SLURM_CONF=$SLURM_CONF"
