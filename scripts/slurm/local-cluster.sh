#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests that run the examples in examples/slurm/ and for trying them by hand.
#
#   scripts/slurm/local-cluster.sh install   Debian's packages (root; seconds where they are cached)
#   scripts/slurm/local-cluster.sh maybe-install   the same where this is root on Debian with apt-get, else
#                                            says why not and exits 0 (`make test`: the SLURM tests then skip)
#   scripts/slurm/local-cluster.sh up DIR    munged, slurmctld and slurmd, their files under DIR; prints SLURM_CONF
#   scripts/slurm/local-cluster.sh down DIR  stops the three daemons this script started under DIR
#
# No systemd and no cgroups: processes tracked by parentage (proctrack/linuxproc), tasks not bound (task/none), the
# node's CPUs handed out one by one (cons_tres, CR_CPU), no accounting database (ended jobs in DIR/jobs.txt).
# Then: export SLURM_CONF=DIR/slurm.conf; sbatch, srun, squeue, scontrol and scancel talk to it.
# SLURMCTLD_PORT and SLURMD_PORT (default 6817, 6818) let two clusters run side by side.
set -euo pipefail

command=${1:-}
dir=${2:-}

install_packages() {
    if [ "$(id -u)" != 0 ]; then
        echo "installing SLURM needs root (apt-get)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }
}

maybe_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "SLURM not installed (needs root and apt-get): the SLURM tests are skipped" >&2
        return 0
    fi
    install_packages || echo "SLURM could not be installed: the SLURM tests are skipped" >&2
}

write_config() {
    local node cpus memory_mib
    node=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc follows OMP_NUM_THREADS otherwise
    memory_mib=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobs.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mib State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start_daemons() {
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    fi
    SLURM_CONF="$dir/slurm.conf" /usr/sbin/slurmctld -f "$dir/slurm.conf"
    SLURM_CONF="$dir/slurm.conf" /usr/sbin/slurmd -f "$dir/slurm.conf"
    export SLURM_CONF="$dir/slurm.conf"
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.5
    done
    echo "the node did not come up; see $dir/log/" >&2
    sinfo >&2 || true
    exit 1
}

stop_daemons() {
    for daemon in slurmd slurmctld; do
        if [ -f "$dir/$daemon.pid" ]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
        fi
    done
}

case "$command" in
install) install_packages ;;
maybe-install) maybe_install ;;
up)
    [ -n "$dir" ] || { echo "usage: $0 up DIR" >&2; exit 2; }
    dir=$(realpath -m "$dir")
    write_config
    start_daemons
    ;;
down)
    [ -n "$dir" ] || { echo "usage: $0 down DIR" >&2; exit 2; }
    dir=$(realpath -m "$dir")
    stop_daemons
    ;;
*)
    echo "usage: $0 install | maybe-install | up DIR | down DIR" >&2
    exit 2
    ;;
esac
