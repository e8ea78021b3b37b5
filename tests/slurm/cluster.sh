#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine: start it, run COMMAND against it, stop it.
#
#   tests/slurm/cluster.sh COMMAND [ARG...]        exit status: COMMAND's (77: cannot run here)
#
# - Needs root. Installs Debian's slurm-wlm and munge when slurmctld is missing (EARL_SLURM_NO_INSTALL=1 to
#   refuse and exit 77 instead).
# - Runs in a private mount namespace (unshare -m) with its own config bind-mounted over /etc/slurm: the slurm
#   executor's job steps drop SLURM_CONF from their environment, so the config must sit at the default path,
#   and the machine's own /etc/slurm is never written. munged gets its own key and socket.
# - Node: this machine (CPUs as slurmd -C detects them, 4000 MB, two GRES "gpu" without devices, so GPU
#   requests are scheduled and checked by SLURM while nothing can use a GPU), ports picked free on 127.0.0.1.
#   No accounting (sacct fails): Snakemake needs --slurm-status-command squeue.
# - EARL_SLURM_JOBS_OUT=FILE: after COMMAND, `scontrol --details --oneliner show jobs` (jobs stay listed MinJobAge=300 s) is
#   written there. EARL_SLURM_KEEP=1 keeps the cluster's directory (configs, logs) for inspection.
# - Stops the daemons it started by PID (cancelling any job left) on every exit; a harness that gives up
#   should kill this script's whole process group (the daemons run in the foreground, in that group).
set -euo pipefail

if [[ -z "${EARL_SLURM_IN_NAMESPACE:-}" ]]; then
    if [[ $(id -u) != 0 ]]; then
        echo "cluster.sh: needs root (runs slurmctld, slurmd and munged, and a private mount namespace)" >&2
        exit 77
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        if [[ -n "${EARL_SLURM_NO_INSTALL:-}" ]]; then
            echo "cluster.sh: slurm-wlm/munge not installed and EARL_SLURM_NO_INSTALL is set" >&2
            exit 77
        fi
        echo "cluster.sh: installing slurm-wlm and munge (Debian packages)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq slurm-wlm munge >&2
    fi
    if ! unshare --mount true 2>/dev/null; then
        echo "cluster.sh: unshare --mount is not permitted here" >&2
        exit 77
    fi
    export EARL_SLURM_IN_NAMESPACE=1
    exec unshare --mount --propagation private -- "$0" "$@"
fi

[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/earl-slurm.XXXXXX")
mkdir -p "$dir"/{etc,state,spool,munge,log}
chmod 711 "$dir/munge"
head -c 1024 /dev/urandom >"$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"

read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
node=$(hostname -s)
# slurmd -C: this machine's CPU layout, so the node is not drained for a mismatch.
layout=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/RealMemory=[0-9]*//')

cat >"$dir/etc/slurm.conf" <<CONF
ClusterName=earltest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 $layout RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
# SLURM drops GPUs without a device file: two character devices equal to /dev/null (regular files if mknod is
# refused; slurmd then logs an error and still counts them).
mkdir -p "$dir/dev"
for i in 0 1; do mknod "$dir/dev/gpu$i" c 1 3 2>/dev/null || : >"$dir/dev/gpu$i"; done
cat >"$dir/etc/gres.conf" <<CONF
NodeName=$node Name=gpu File=$dir/dev/gpu[0-1]
CONF

mkdir -p /etc/slurm  # a mount point; the package creates it, and nothing is written into it
mount --bind "$dir/etc" /etc/slurm

pids=()
stop() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "${EARL_SLURM_JOBS_OUT:-}" ]]; then
        scontrol --details --oneliner show jobs >"$EARL_SLURM_JOBS_OUT" 2>&1 || true
    fi
    if scancel --quiet --user "$(id -un)" 2>/dev/null; then  # jobs left running: slurmd must still kill them
        for _ in $(seq 20); do
            [[ -z $(squeue --noheader --states=R,CG --format=%i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [[ $rc != 0 ]]; then
        for log in "$dir"/log/*.log; do
            echo "--- cluster.sh: last lines of $log" >&2
            tail -n 15 "$log" >&2 || true
        done
    fi
    umount /etc/slurm 2>/dev/null || true
    if [[ -z "${EARL_SLURM_KEEP:-}" ]]; then rm -rf "$dir"; else echo "cluster.sh: kept $dir" >&2; fi
    exit "$rc"
}
trap stop EXIT
trap 'exit 143' INT TERM

munged --foreground --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
    >"$dir/log/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -S $dir/munge/munge.socket.2 ]] && break; sleep 0.1; done
slurmctld -D -i >"$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D >"$dir/log/slurmd.out" 2>&1 &
pids+=($!)

state=""
while ((SECONDS < 60)); do
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "cluster.sh: a daemon exited at start (PID $pid)" >&2; exit 1; }
    done
    state=$(timeout 10 sinfo --noheader --format=%t 2>/dev/null || true)
    [[ $state == idle || $state == inval || $state == drain ]] && break
    sleep 0.5
done
if [[ $state != idle ]]; then
    echo "cluster.sh: node did not become idle (state: '${state:-no answer}')" >&2
    exit 1
fi
echo "cluster.sh: one-node cluster up ($node, slurmctld 127.0.0.1:$ctld_port, $dir)" >&2

# COMMAND runs in the background so that a TERM or INT reaches this script at once (bash defers traps while a
# foreground child runs): the child gets TERM, then KILL after 10 s, then the cluster stops.
"$@" &
child=$!
terminate() {
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$child" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$child" 2>/dev/null || true
    exit 143
}
trap terminate INT TERM
set +e
wait "$child"
rc=$?
set -e
exit "$rc"
