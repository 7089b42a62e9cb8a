#!/usr/bin/env bash
# A real Slurm cluster on one machine for tests: slurmctld in the root network namespace,
# one slurmd per network namespace (hpcs-n1..N) on a bridge (hpcs-br0, 10.99.0.0/24).
#
#   cluster.sh up N [--with-openmpi]   start N nodes, print `export SLURM_CONF=...`
#   cluster.sh down                    stop everything, remove namespaces/bridge/hosts lines
#   cluster.sh status                  what is running
#
# Needs root. State (config, spool, logs, pid files) lives under
# $HPCSERVE_SLURM_DIR (default /tmp/hpcserve-slurm), the munge key and socket under
# $HPCSERVE_SLURM_MUNGE_DIR (default /run/hpcserve-slurm-munge). `down` is idempotent and also
# undoes a half-finished `up`.
set -euo pipefail

STATE_DIR="${HPCSERVE_SLURM_DIR:-/tmp/hpcserve-slurm}"
# munged wants every directory above its socket searchable by all: a pytest tmp dir
# (/tmp/pytest-of-root is 0700) is not, so munge gets a place of its own.
MUNGE_DIR="${HPCSERVE_SLURM_MUNGE_DIR:-/run/hpcserve-slurm-munge}"
BRIDGE="hpcs-br0"
NS_PREFIX="hpcs-n"
VETH_PREFIX="hpcs-v"        # host side of node i's veth: hpcs-v<i> (IFNAMSIZ is 15)
SUBNET_PREFIX="10.99.0"
CTL_ADDR="${SUBNET_PREFIX}.1"
CTL_PORT="${HPCSERVE_SLURM_CTL_PORT:-6817}"
NODE_CPUS="${HPCSERVE_SLURM_CPUS:-$(nproc)}"
HOSTS_TAG="# hpcserve-slurm-test"
# Who owns the cluster that is up (the bridge is machine-wide):
# "OWNER_PID OWNER_START STATE_DIR MUNGE_DIR" (OWNER_START: the owner's start time, so a
# recycled pid is no owner). The owner is the process that asked for it
# (HPCSERVE_SLURM_OWNER_PID, else our parent); a cluster whose owner is gone was left by a run
# that was killed, and the next `up` clears it.
OWNER_FILE="${HPCSERVE_SLURM_OWNER_FILE:-/run/hpcserve-slurm-cluster.owner}"
OWNER_PID="${HPCSERVE_SLURM_OWNER_PID:-$PPID}"
READY_TIMEOUT_S="${HPCSERVE_SLURM_READY_TIMEOUT:-30}"
STOP_TIMEOUT_S=5           # daemons: TERM, then KILL after this
TASK_STOP_TIMEOUT_S=1      # node-namespace processes (slurmstepd ignores TERM)
MAX_NODES=50

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_addr() { echo "${SUBNET_PREFIX}.$((10 + $1))"; }

# --- waiting, bounded -------------------------------------------------------------------

# wait_until SECONDS CMD...: run CMD until it succeeds or SECONDS pass (polls every 0.1 s).
wait_until() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# A zombie (state Z: its parent has not reaped it yet) counts as dead.
pid_alive() {
    [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ "${stat:0:1}" != Z ]]
}
pid_dead() { ! pid_alive "$1"; }

# A process's start time (clock ticks after boot, /proc/PID/stat field 22); empty if gone.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    read -r -a fields <<<"$stat"
    echo "${fields[19]}"
}

all_dead() {
    local pid
    for pid in "$@"; do pid_alive "$pid" && return 1; done
    return 0
}

# stop_pids SECONDS PID...: TERM all, wait (one shared bound), then KILL the survivors.
stop_pids() {
    local bound=$1; shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_until "$bound" all_dead "$@" && return 0
    local pid
    for pid in "$@"; do
        pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    done
    wait_until 2 all_dead "$@" || log "some of pids $* survived KILL"
}

stop_pidfile() {
    local file=$1 pid
    [[ -f "$file" ]] || return 0
    pid=$(tr -dc '0-9' <"$file" || true)
    [[ -n "$pid" ]] && stop_pids "$STOP_TIMEOUT_S" "$pid"
    rm -f "$file"
}

our_namespaces() {
    ip netns list 2>/dev/null | awk -v p="^${NS_PREFIX}[0-9]+$" '$1 ~ p {print $1}'
}

# Every process inside one of our node namespaces (slurmd, slurmstepd, job tasks) is ours:
# match on the namespace inode, never on a process name. One pass over /proc.
namespace_pids() {
    local ns p link targets=" "
    for ns in $(our_namespaces); do
        targets+="net:[$(stat -L -c '%i' "/run/netns/$ns" 2>/dev/null)] "
    done
    [[ "$targets" != " " ]] || return 0
    for p in /proc/[0-9]*; do
        link=$(readlink "$p/ns/net" 2>/dev/null) || continue
        [[ "$targets" == *" $link "* ]] && echo "${p#/proc/}"
    done
    return 0
}

# --- /etc/hosts (rewritten in place: it may be a bind mount) ------------------------------

hosts_remove() {
    grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
    local kept
    kept=$(grep -v "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
}

hosts_add() {
    local n=$1 i
    hosts_remove
    for ((i = 1; i <= n; i++)); do
        echo "$(node_addr "$i") n$i $HOSTS_TAG" >>/etc/hosts
    done
}

# --- install --------------------------------------------------------------------------------

ensure_packages() {
    local want=(slurm-wlm munge) missing=() pkg
    [[ "${WITH_OPENMPI:-0}" == 1 ]] && want+=(openmpi-bin)
    for pkg in "${want[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# --- network ----------------------------------------------------------------------------------

net_up() {
    local n=$1 i ns veth
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= n; i++)); do
        ns="${NS_PREFIX}$i"
        veth="${VETH_PREFIX}$i"
        ip netns add "$ns"
        ip link add "$veth" type veth peer name "${veth}p"
        ip link set "${veth}p" netns "$ns"
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" link set "${veth}p" name eth0
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$CTL_ADDR"
    done
}

net_down() {
    local ns link
    for ns in $(our_namespaces); do
        ip netns delete "$ns" 2>/dev/null || true
    done
    for link in $(ip -o link show 2>/dev/null |
        awk -F': ' -v p="^${VETH_PREFIX}[0-9]+(@|$)" '$2 ~ p {split($2, a, "@"); print a[1]}'); do
        ip link delete "$link" 2>/dev/null || true
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
}

# --- config -------------------------------------------------------------------------------

write_config() {
    local n=$1 i
    mkdir -p "$STATE_DIR"/{ctld,log,run,spool} "$MUNGE_DIR"
    for ((i = 1; i <= n; i++)); do
        mkdir -p "$STATE_DIR/spool/n$i" "$STATE_DIR/tmp-n$i"
    done
    # munged refuses keys and sockets in group/other-writable places.
    chmod 755 "$STATE_DIR" "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$MUNGE_DIR/munge.key"
    chown -R munge:munge "$MUNGE_DIR"

    local last_addr first_job_id
    last_addr=$(node_addr "$n")
    # Job ids of their own for each cluster brought up here (under Slurm's MaxJobId): a fresh
    # slurmctld state would count from 1 again, and MPICH names a step's /dev/shm segment by a
    # hash of its PMI job id "<job>.<step>", in the /dev/shm that every cluster on this machine
    # shares. A segment left by a step of an earlier cluster that died inside MPI_Init (before
    # mpi_workers/mpi_shm.py unlinks it) would be opened, not created, by the same-numbered
    # step of a later cluster (seen: a CI run's step 7.2 left one for the next run's 7.2).
    first_job_id=$(( $(date +%s) % 60000 * 1000 + 1 ))  # 1000 ids a second, for 16 h
    cat >"$STATE_DIR/slurm.conf" <<EOF
# Written by slurm/testing/cluster.sh; removed at 'down'.
ClusterName=hpcserve-test
FirstJobId=$first_job_id
SlurmctldHost=$(hostname -s)($CTL_ADDR)
SlurmctldPort=$CTL_PORT
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket.2
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=2
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
TmpFS=$STATE_DIR/tmp-%n
NodeName=n[1-$n] NodeAddr=${SUBNET_PREFIX}.[11-${last_addr##*.}] CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

# --- daemons --------------------------------------------------------------------------------

munge_ready() {
    munge -n -S "$MUNGE_DIR/munge.socket.2" 2>/dev/null | unmunge \
        -S "$MUNGE_DIR/munge.socket.2" >/dev/null 2>&1
}

ctld_ready() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

idle_nodes() {
    sinfo -h -N -p debug -t idle -o '%N' 2>/dev/null | sort -u | wc -l
}

all_idle() { [[ "$(idle_nodes)" -eq "$1" ]]; }

daemons_up() {
    local n=$1 i
    export SLURM_CONF="$STATE_DIR/slurm.conf"
    runuser -u munge -- munged \
        --key-file="$MUNGE_DIR/munge.key" \
        --socket="$MUNGE_DIR/munge.socket.2" \
        --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    wait_until 10 munge_ready || die "munged did not answer; see $MUNGE_DIR/munged.log"

    slurmctld -i -f "$SLURM_CONF"
    wait_until 15 ctld_ready || die "slurmctld did not answer; see $STATE_DIR/log/slurmctld.log"

    for ((i = 1; i <= n; i++)); do
        nsenter --net="/run/netns/${NS_PREFIX}$i" slurmd -f "$SLURM_CONF" -N "n$i"
    done
    wait_until "$READY_TIMEOUT_S" all_idle "$n" ||
        die "only $(idle_nodes)/$n nodes idle after ${READY_TIMEOUT_S}s; see $STATE_DIR/log"
}

# --- commands -------------------------------------------------------------------------------

cmd_down() {
    # slurmctld first (it stops in ~0.1 s while its nodes still answer), then everything
    # in the node namespaces (slurmd, slurmstepd, job tasks) at once, then munged.
    local f pids
    stop_pidfile "$STATE_DIR/run/slurmctld.pid"
    mapfile -t pids < <(namespace_pids)
    for f in "$STATE_DIR"/run/slurmd-*.pid; do
        [[ -f "$f" ]] && pids+=("$(tr -dc '0-9' <"$f" || true)")
    done
    stop_pids "$TASK_STOP_TIMEOUT_S" "${pids[@]}"
    rm -f "$STATE_DIR"/run/slurmd-*.pid
    stop_pidfile "$MUNGE_DIR/munged.pid"
    net_down
    hosts_remove
    rm -f "$OWNER_FILE"
    # Only remove a directory this script made, and keep it when asked (failed up: logs).
    if [[ "${1:-}" != --keep-state && -f "$STATE_DIR/.hpcserve-slurm" ]]; then
        rm -rf "$STATE_DIR" "$MUNGE_DIR"
    fi
}

# A cluster is up already: refuse when its owner still runs; clear it when the owner is gone
# (a killed test run leaves daemonized slurmctld/slurmd, namespaces and the bridge behind).
clear_abandoned_cluster() {
    local owner="" owner_start="" owner_state="" owner_munge=""
    [[ -f "$OWNER_FILE" ]] && read -r owner owner_start owner_state owner_munge <"$OWNER_FILE"
    if [[ -n "$owner" ]] && pid_alive "$owner" && [[ "$(start_time "$owner")" == "$owner_start" ]]
    then
        die "a cluster is already up for pid $owner (run 'down' first); state in $owner_state"
    fi
    if [[ -z "$owner" ]] && pgrep -x slurmctld >/dev/null; then
        die "a cluster is already up (slurmctld runs; run 'down' first); state in $STATE_DIR"
    fi
    log "clearing a cluster whose owner ${owner:-(unknown)} is gone (state ${owner_state:-unknown})"
    (
        STATE_DIR=${owner_state:-$STATE_DIR}
        MUNGE_DIR=${owner_munge:-$MUNGE_DIR}
        cmd_down
    )
}

# After a failed up: show the log tails, stop everything, keep the logs for a look.
fail_up() {
    local rc=$1 f
    trap - EXIT INT TERM
    for f in "$STATE_DIR"/log/*.log "$MUNGE_DIR/munged.log"; do
        [[ -s "$f" ]] || continue
        log "--- tail of $f"
        tail -n 5 "$f" >&2
    done
    log "up failed; tearing down (logs kept in $STATE_DIR; 'down' removes them)"
    cmd_down --keep-state || true
    exit "$rc"
}

cmd_up() {
    local n=${1:-}
    [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= MAX_NODES)) || die "usage: up N (1..$MAX_NODES)"
    ((EUID == 0)) || die "needs root (network namespaces, slurmd as root)"
    if [[ -f "$STATE_DIR/run/slurmctld.pid" ]] || ip link show "$BRIDGE" >/dev/null 2>&1; then
        clear_abandoned_cluster
    fi
    ensure_packages
    for tool in slurmctld slurmd munged sinfo nsenter ip runuser; do
        command -v "$tool" >/dev/null || die "$tool not found"
    done

    # From here on, any failure (or Ctrl-C) undoes what was done.
    trap 'fail_up $?' EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$STATE_DIR"
    touch "$STATE_DIR/.hpcserve-slurm"
    net_up "$n"
    hosts_add "$n"
    write_config "$n"
    daemons_up "$n"
    echo "$OWNER_PID $(start_time "$OWNER_PID") $STATE_DIR $MUNGE_DIR" >"$OWNER_FILE"
    trap - EXIT INT TERM

    echo "export SLURM_CONF=$STATE_DIR/slurm.conf"
}

cmd_status() {
    local conf="$STATE_DIR/slurm.conf" f pid name
    if [[ ! -f "$conf" ]]; then
        echo "down (no $conf)"
        return 0
    fi
    echo "SLURM_CONF=$conf"
    for f in "$MUNGE_DIR/munged.pid" "$STATE_DIR"/run/*.pid; do
        [[ -e "$f" ]] || continue
        pid=$(tr -dc '0-9' <"$f" || true)
        name=$(basename "$f" .pid)
        if pid_alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: dead"; fi
    done
    SLURM_CONF="$conf" sinfo -N -o '%N %T %c %O' 2>/dev/null || echo "sinfo: no answer"
}

main() {
    local cmd=${1:-}
    shift || true
    WITH_OPENMPI=0
    local args=()
    for a in "$@"; do
        case "$a" in
            --with-openmpi) WITH_OPENMPI=1 ;;
            *) args+=("$a") ;;
        esac
    done
    case "$cmd" in
        up) cmd_up "${args[@]}" ;;
        down) cmd_down "${args[@]}" ;;
        status) cmd_status ;;
        *) die "usage: $0 up N [--with-openmpi] | down | status" ;;
    esac
}

main "$@"
