#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurmctld/slurmd/slurmdbd + munge + a private MariaDB) for
# tests and CI, kept under one prefix directory (README: "Tested on a real Slurm").
#
#   scripts/slurm.sh install   apt-get the packages if missing (root)
#   scripts/slurm.sh start     install if needed, write the config, start the daemons; idempotent
#   scripts/slurm.sh stop      cancel jobs, stop the daemons this script started (recorded PIDs)
#   scripts/slurm.sh status    exit 0 when every daemon runs and the node is usable
#   scripts/slurm.sh env       print `export SLURM_CONF=...` (eval it)
#   scripts/slurm.sh clean     stop, then remove the prefix
#
# Environment: ZIPASR_SLURM_PREFIX (default /tmp/zipasr-slurm), ZIPASR_SLURM_ACCOUNTING=dbd|none
# (dbd: sacct works, which the Snakemake plugin's default status command needs; none: use
# `--slurm-status-command squeue`), ZIPASR_SLURM_FAKE_GPUS (default 2: gres backed by dummy char
# devices, so GPU requests are scheduled and CUDA_VISIBLE_DEVICES is set; code still runs on CPU).
set -euo pipefail

PREFIX=${ZIPASR_SLURM_PREFIX:-/tmp/zipasr-slurm}
ACCOUNTING=${ZIPASR_SLURM_ACCOUNTING:-dbd}
FAKE_GPUS=${ZIPASR_SLURM_FAKE_GPUS:-2}
CLUSTER=localci
ACCOUNT=ci
DB_PORT=3307
# The slurm-jobstep plugin drops SLURM_CONF before its inner srun, so the config must also be
# at the compiled-in path: one cluster per machine.
SYSTEM_CONF=/etc/slurm/slurm.conf

ETC=$PREFIX/etc
RUN=$PREFIX/run
LOG=$PREFIX/log
MUNGE_SOCK=$PREFIX/munge-run/munge.socket
CONF=$ETC/slurm.conf
# Stop order (start is the reverse).
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

log() { echo "slurm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

packages() {
    local p=(slurmctld slurmd slurm-client munge)
    [[ $ACCOUNTING == dbd ]] && p+=(slurmdbd mariadb-server)
    echo "${p[@]}"
}

installed() {
    local pkg
    for pkg in $(packages); do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || return 1
    done
}

cmd_install() {
    installed && return 0
    [[ $(id -u) == 0 ]] || die "installing $(packages) needs root"
    command -v apt-get >/dev/null || die "no apt-get: install $(packages) yourself"
    # Debian starts services on install unless policy-rc.d says no; we run our own daemons.
    local policy=/usr/sbin/policy-rc.d added=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; added=1
    fi
    mkdir -p "$PREFIX"
    log "installing $(packages)"
    # `apt-get update` only when the package lists are missing or stale for these packages.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            $(packages) >"$PREFIX/apt.log" 2>&1; then
        apt-get update -q >>"$PREFIX/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            $(packages) >>"$PREFIX/apt.log" 2>&1 || { [[ -n $added ]] && rm -f "$policy";
            die "apt-get install failed, see $PREFIX/apt.log"; }
    fi
    [[ -n $added ]] && rm -f "$policy"
    installed || die "packages still missing after install"
}

# --- PIDs: only processes this script started, checked by name before any signal -----------
pid_of() {  # prints the recorded PID of daemon $1 if that process still runs as $1
    local f=$RUN/$1.pid pid comm
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$1" ]] || return 1
    echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

launch() {  # launch NAME CMD...: start a foreground daemon detached, record its PID
    local name=$1; shift
    if running "$name"; then return 0; fi
    # setsid: the daemons outlive this script and a timeout that kills the caller's group.
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
    local secs=$1 what=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${secs}s waiting for $what (logs: $LOG)"
        sleep 0.5
    done
}

stop_daemon() {
    local name=$1 pid
    pid=$(pid_of "$name") || { rm -f "$RUN/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while [[ -e /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; do
        if ((SECONDS >= end)); then
            log "$name ($pid) ignored SIGTERM for 15s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$RUN/$name.pid"
}

# --- configuration --------------------------------------------------------------------------
write_config() {
    # munged wants execute permission for all on every directory above its socket.
    mkdir -p "$PREFIX"
    chmod 755 "$PREFIX"
    local d=$PREFIX
    while d=$(dirname "$d") && [[ $d != / ]]; do
        [[ $(stat -c %A "$d") == ?????????[xt] ]] \
            || die "$d is not world-executable (munged refuses); pick another ZIPASR_SLURM_PREFIX"
    done
    mkdir -p "$ETC" "$RUN" "$LOG" "$PREFIX/state/ctld" "$PREFIX/state/d" "$PREFIX/munge-run" \
        "$PREFIX/munge-key" "$PREFIX/munge-lib"
    chmod 755 "$PREFIX/munge-run"   # munged: socket dir 0755, key dir 0700, not the same dir
    chmod 700 "$PREFIX/munge-key"
    if [[ ! -s $PREFIX/munge-key/munge.key ]]; then
        dd if=/dev/urandom of="$PREFIX/munge-key/munge.key" bs=1024 count=1 status=none
        chmod 400 "$PREFIX/munge-key/munge.key"
    fi

    local gres_node="" gres_conf=""
    if ((FAKE_GPUS > 0)); then
        mkdir -p "$PREFIX/fakedev"
        local i
        for ((i = 0; i < FAKE_GPUS; i++)); do
            # Slurm wants a character device; /dev/null's numbers do.
            [[ -c $PREFIX/fakedev/nvidia$i ]] || mknod "$PREFIX/fakedev/nvidia$i" c 1 3
        done
        gres_node=" Gres=gpu:$FAKE_GPUS"
        gres_conf="GresTypes=gpu"
        echo "Name=gpu File=$PREFIX/fakedev/nvidia[0-$((FAKE_GPUS - 1))]" >"$ETC/gres.conf"
    fi

    # The node line as slurmd sees this machine (CPUs, sockets, RealMemory).
    local node
    node=$(slurmd -C | head -1) || die "slurmd -C failed"
    local host
    host=$(hostname -s)

    local acct
    if [[ $ACCOUNTING == dbd ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# the slurmctld->slurmdbd connection finds munge through this, not through AuthInfo
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux"
    else
        acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi

    cat >"$CONF" <<EOF
# written by scripts/slurm.sh start
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/d
SlurmctldPidFile=$RUN/slurmctld.daemonpid
SlurmdPidFile=$RUN/slurmd.daemonpid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# no cgroups on this machine
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job with no --mem takes the whole node
DefMemPerCPU=1024
ReturnToService=2
MinJobAge=300
# scancel and time limits take effect within seconds (default 30)
KillWait=5
SchedulerType=sched/backfill
$acct
$gres_conf
$node NodeAddr=127.0.0.1$gres_node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    sed -i "s/^NodeName=[^ ]*/NodeName=$host/" "$CONF"

    if [[ $ACCOUNTING == dbd ]]; then
        # slurmdbd reads slurmdbd.conf next to $SLURM_CONF; it must be mode 600.
        cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemonpid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$ETC/slurmdbd.conf"
    fi
}

link_system_conf() {
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]] && return 0
        if [[ -L $SYSTEM_CONF && ! -e $SYSTEM_CONF ]]; then
            rm -f "$SYSTEM_CONF"   # a dangling link from an earlier prefix
        else
            die "$SYSTEM_CONF exists and is not ours: another Slurm runs on this machine"
        fi
    fi
    ln -s "$CONF" "$SYSTEM_CONF"
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        [[ $ACCOUNTING != dbd && ($d == slurmdbd || $d == mariadbd) ]] && continue
        running "$d" || return 1
    done
}

node_ready() {
    local state
    state=$(SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null | head -1)
    [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

db_sql() { mariadb --no-defaults -S "$RUN/mariadb.sock" -u root -e "$1"; }
db_ready() { db_sql 'select 1'; }
dbd_ready() { SLURM_CONF=$CONF sacctmgr -n show cluster; }

cmd_start() {
    local t0=$SECONDS
    cmd_install
    if all_running && node_ready; then
        link_system_conf
        log "already running ($PREFIX)"
        return 0
    fi
    if [[ -d $RUN ]] && ls "$RUN"/*.pid >/dev/null 2>&1; then
        log "partially running: restarting"
        cmd_stop
    fi
    write_config
    link_system_conf
    export SLURM_CONF=$CONF

    launch munged munged -F --socket="$MUNGE_SOCK" --key-file="$PREFIX/munge-key/munge.key" \
        --pid-file="$RUN/munged.daemonpid" --log-file="$LOG/munged.log" \
        --seed-file="$PREFIX/munge-lib/munged.seed"
    wait_for 20 munged test -S "$MUNGE_SOCK"

    if [[ $ACCOUNTING == dbd ]]; then
        if [[ ! -d $PREFIX/db/mysql ]]; then
            mariadb-install-db --no-defaults --user=root --datadir="$PREFIX/db" \
                >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $LOG"
        fi
        launch mariadbd mariadbd --no-defaults --user=root --datadir="$PREFIX/db" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$RUN/mariadb.sock" \
            --pid-file="$RUN/mariadbd.daemonpid" --log-error="$LOG/mariadb.log"
        wait_for 60 mariadb db_ready
        # root only logs in over the unix socket; slurmdbd talks TCP, as its own user.
        # mariadb-install-db adds anonymous users, which would match before 'slurm'@'%'.
        db_sql "DROP USER IF EXISTS ''@'localhost', ''@'$(hostname)', ''@'$(hostname -s)';
                CREATE USER IF NOT EXISTS 'slurm'@'%'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%';" \
            || die "could not create the slurm database user"
        launch slurmdbd slurmdbd -D
        wait_for 60 slurmdbd dbd_ready
        # Idempotent: "already exists" is not an error for us.
        sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" >/dev/null 2>&1 || true
        sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" \
            >/dev/null 2>&1 || true
        sacctmgr -n -P show assoc where user=root account="$ACCOUNT" | grep -q . \
            || die "sacctmgr could not add user root to account $ACCOUNT"
    fi

    launch slurmctld slurmctld -D
    wait_for 60 slurmctld env SLURM_CONF="$CONF" scontrol ping
    launch slurmd slurmd -D
    wait_for 60 "node to become idle" node_ready
    all_running || die "a daemon died during start (logs: $LOG)"
    log "started in $((SECONDS - t0))s: prefix $PREFIX, accounting $ACCOUNTING, $FAKE_GPUS fake GPUs"
}

cmd_stop() {
    if running slurmctld; then
        # Jobs first, so no slurmstepd is left behind.
        SLURM_CONF=$CONF scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
        local end=$((SECONDS + 20))
        while SLURM_CONF=$CONF squeue -h -t R,CG,PD 2>/dev/null | grep -q .; do
            ((SECONDS < end)) || { log "jobs still listed after 20s; stopping anyway"; break; }
            sleep 0.5
        done
    fi
    local d
    for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
    unlink_system_conf
    log "stopped"
}

cmd_status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        [[ $ACCOUNTING != dbd && ($d == slurmdbd || $d == mariadbd) ]] && continue
        if pid=$(pid_of "$d"); then echo "$d: running ($pid)"; else echo "$d: stopped"; rc=1; fi
    done
    if ((rc == 0)); then
        SLURM_CONF=$CONF sinfo -N -o '%N %t %c %m %G' || rc=1
        node_ready || rc=1
    fi
    return $rc
}

cmd_clean() {
    cmd_stop
    [[ $PREFIX == / || -z $PREFIX ]] && die "refusing to remove prefix '$PREFIX'"
    rm -rf "$PREFIX"
    log "removed $PREFIX"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    clean) cmd_clean ;;
    *) echo "usage: $0 install|start|stop|status|env|clean" >&2; exit 2 ;;
esac
