#!/usr/bin/env bash
# A real Slurm cluster on one machine, for largemim's launcher and requeue tests.
#
#   slurm/local_cluster.sh start|stop|status [--nodes N] [--base DIR]
#
# One munged, one slurmctld and N slurmd daemons (nodes n1..nN, partition "debug"), all on 127.0.0.1.
# Each slurmd runs in its own UTS+mount namespace with its own host name and a hosts file that maps
# n1..nN to 127.0.0.1, so a job sees N distinct nodes and MASTER_ADDR=n1 resolves. Every file the
# cluster uses (config, munge key and socket, state, spool, logs, pid files) lives under the base folder;
# the machine's own /etc/hosts, host name and services are left alone. Needs root (Debian/Ubuntu).
# After `start`:  source "$BASE/env.sh"   (exports SLURM_CONF, puts $BASE/bin with a sacct stand-in first
# on PATH).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status [--nodes N] [--base DIR]" >&2
    echo "  --nodes N   number of nodes n1..nN (default 2; start only)" >&2
    echo "  --base DIR  folder for everything the cluster uses (default \${LARGEMIM_SLURM_BASE:-/tmp/largemim-slurm})" >&2
    exit 2
}

die() {
    echo "local_cluster: error: $*" >&2
    exit 1
}

log() { echo "local_cluster: $*"; }

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || usage
CMD=$1
shift
NODES=2
BASE=${LARGEMIM_SLURM_BASE:-/tmp/largemim-slurm}
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) [[ $# -ge 2 ]] || usage; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --base) [[ $# -ge 2 ]] || usage; BASE=$2; shift 2 ;;
        --base=*) BASE=${1#*=}; shift ;;
        -h|--help) usage ;;
        *) echo "local_cluster: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $BASE == /* ]] || BASE="$(pwd)/$BASE"
BASE=${BASE%/}
[[ -n $BASE && $BASE != / ]] || die "--base must not be /"

# Ports: slurmctld on PORT, slurmd of node i on PORT+i. Override when two clusters share a machine.
PORT=${LARGEMIM_SLURM_PORT:-17000}
CONF=$BASE/etc/slurm.conf
RUN=$BASE/run
LOGS=$BASE/log
MUNGE_SOCKET=$BASE/munge/run/munge.socket.2
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- process helpers
# A pid counts as alive unless it is gone or a zombie: after a crash PID 1 reaps orphans a little late.
pid_alive() {
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# Prints the pid in PIDFILE if that process is alive and is ours: its command line names the daemon
# and the base folder (so that a recycled pid is never mistaken for one of our daemons).
our_pid() {
    local pidfile=$1 name=$2 pid cmdline
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    pid_alive "$pid" || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$name"* && $cmdline == *"$BASE"* ]] || return 1
    echo "$pid"
}

# Daemons: "name pidfile" lines, in start order.
daemons() {
    local n i
    echo "munged $RUN/munged.pid"
    echo "slurmctld $RUN/slurmctld.pid"
    n=$(cat "$RUN/nodes" 2>/dev/null || echo "$NODES")
    for ((i = 1; i <= n; i++)); do
        echo "slurmd $RUN/slurmd.n$i.pid"
    done
}

# Pids of every process in the UTS namespace NS (a node's namespace), never the machine's own one.
pids_in_ns() {
    local ns=$1 host_ns p
    # PID 1's namespace may be unreadable (a sandbox's init): then only our own one is excluded.
    host_ns=$(readlink /proc/1/ns/uts 2>/dev/null || true)
    [[ -n $ns && $ns != "$host_ns" && $ns != "$(readlink /proc/$$/ns/uts)" ]] || return 0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $(readlink "/proc/$p/ns/uts" 2>/dev/null) == "$ns" ]] && pid_alive "$p" && echo "$p"
    done
    return 0
}

# Sends TERM to PIDS, waits up to SECS for them to go, then KILLs what is left. Returns 1 if any survive.
terminate() {
    local secs=$1 p t left
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((t = 0; t < secs * 10; t++)); do
        left=()
        for p in "$@"; do pid_alive "$p" && left+=("$p"); done
        [[ ${#left[@]} -eq 0 ]] && return 0
        sleep 0.1
    done
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.5
    for p in "${left[@]}"; do pid_alive "$p" && return 1; done
    return 0
}

log_tails() {
    local f
    for f in "$LOGS"/*.log; do
        [[ -f $f ]] || continue
        echo "----- tail of $f" >&2
        tail -n 15 "$f" >&2
    done
}

# ---------------------------------------------------------------- start
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    local try
    for try in 1 2 3 4 5; do
        apt-get -o DPkg::Lock::Timeout=120 update -qq && break
        [[ $try -eq 5 ]] && die "apt-get update failed 5 times"
        echo "local_cluster: apt-get update failed (try $try), retrying" >&2
        sleep $((try * 3))
    done
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
}

# write_config [check]: write slurm.conf and the nodes' hosts file; with "check", only say (exit status)
# whether the slurm.conf in place is the one this script writes now.
write_config() {
    local hw last i names
    # CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore, RealMemory exactly as slurmd sees
    # them: a node may not claim more than that.
    hw=$(env -u SLURM_CONF slurmd -C 2>/dev/null | head -n 1 | tr ' ' '\n' \
        | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    [[ $hw == *CPUs=* ]] || die "could not read the hardware from 'slurmd -C'"
    last=$((PORT + NODES))
    names=$(seq -f 'n%g' 1 "$NODES" | tr '\n' ' ')

    mkdir -p "$BASE/etc"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a ${NODES}-node Slurm cluster on this machine. Do not edit; rerun start.
ClusterName=largemim
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~11 s instead of ~2 min.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$BASE/state/slurmctld
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# No accounting daemon: finished jobs are written to a text file that bin/sacct falls back on.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=5
ReturnToService=2
JobRequeue=1
# Time-limit tests: SIGTERM exactly at the limit, SIGKILL 10 s later.
OverTimeLimit=0
KillWait=10
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
# Preemption as production clusters set it up: a job in "urgent" requeues "debug" jobs in its way. They
# get SIGTERM, and Slurm requeues them itself GraceTime later unless they have ended (or requeued) by then.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$last] $hw State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=n[1-$NODES] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
    if [[ ${1:-} == check ]]; then
        local same=0
        cmp -s "$CONF.tmp" "$CONF" || same=1
        rm -f "$CONF.tmp"
        return "$same"
    fi
    mv "$CONF.tmp" "$CONF"

    # The nodes' hosts file: the machine's one plus n1..nN.
    { cat /etc/hosts; echo "127.0.0.1 $names"; } >"$BASE/etc/hosts"
    chmod 0644 "$BASE/etc/hosts"
}

write_tools() {
    mkdir -p "$BASE/bin"
    # sacct stand-in. The real sacct needs slurmdbd; submitit polls
    #   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
    # and waits forever if it never sees a final state. Live jobs come from `scontrol show job -o`,
    # jobs slurmctld has already forgotten (MinJobAge) from the jobcomp text file.
    cat >"$BASE/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in written by slurm/local_cluster.sh (the local cluster has no accounting database).
# Understands -o/--format, -j/--jobs, -P/--parsable2, -p/--parsable, -n/--noheader; ignores other flags.
set -uo pipefail
JOBCOMP=__JOBCOMP__
fields=JobID,JobName,Partition,State,ExitCode,NodeList
ids=()
sep=" "
trail=""
header=1
while [[ $# -gt 0 ]]; do
    case $1 in
        -o|--format) fields=$2; shift 2 ;;
        --format=*) fields=${1#*=}; shift ;;
        -o*) fields=${1#-o}; shift ;;
        -j|--jobs) IFS=, read -ra more <<<"$2"; ids+=("${more[@]}"); shift 2 ;;
        --jobs=*) IFS=, read -ra more <<<"${1#*=}"; ids+=("${more[@]}"); shift ;;
        -j*) IFS=, read -ra more <<<"${1#-j}"; ids+=("${more[@]}"); shift ;;
        -P|--parsable2) sep="|"; trail=""; shift ;;
        -p|--parsable) sep="|"; trail="|"; shift ;;
        -n|--noheader) header=0; shift ;;
        *) shift ;;
    esac
done
IFS=, read -ra cols <<<"$fields"

# One scontrol/jobcomp record (key=value words) -> one output line with the requested columns.
format() {
    awk -v cols="${fields}" -v sep="$sep" -v trail="$trail" '
    {
        delete kv
        for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) kv[substr($i, 1, p - 1)] = substr($i, p + 1) }
        id = kv["JobId"]
        if (kv["ArrayJobId"] != "" && kv["ArrayTaskId"] != "") id = kv["ArrayJobId"] "_" kv["ArrayTaskId"]
        n = split(cols, c, ",")
        line = ""
        for (i = 1; i <= n; i++) {
            f = tolower(c[i]); sub(/%.*/, "", f); v = ""
            if (f == "jobid") v = id
            else if (f == "jobidraw") v = kv["JobId"]
            else if (f == "state") { v = kv["JobState"]; if (v == "") v = kv["State"] }
            else if (f == "nodelist") { v = kv["NodeList"]; if (v == "" || v == "(null)") v = "None assigned" }
            else if (f == "jobname") { v = kv["JobName"]; if (v == "") v = kv["Name"] }
            else if (f == "partition") v = kv["Partition"]
            else if (f == "exitcode") v = kv["ExitCode"]
            else if (f == "start") v = kv["StartTime"]
            else if (f == "end") v = kv["EndTime"]
            else if (f == "submit") v = kv["SubmitTime"]
            else if (f == "elapsed") v = kv["RunTime"]
            else if (f == "timelimit") v = kv["TimeLimit"]
            else if (f == "reason") v = kv["Reason"]
            else if (f == "nnodes") { v = kv["NumNodes"]; if (v == "") v = kv["NodeCnt"] }
            else if (f == "user") { v = kv["UserId"]; sub(/\(.*/, "", v) }
            line = line (i > 1 ? sep : "") v
        }
        print line trail
    }'
}

if [[ $header -eq 1 ]]; then
    h=""
    for c in "${cols[@]}"; do h+="${h:+$sep}${c%%%*}"; done
    echo "$h$trail"
fi
if [[ ${#ids[@]} -eq 0 ]]; then
    scontrol show job -o 2>/dev/null | grep '^JobId=' | format
    exit 0
fi
for id in "${ids[@]}"; do
    id=${id%%.*}
    if out=$(scontrol show job -o "$id" 2>/dev/null) && [[ $out == JobId=* ]]; then
        printf '%s\n' "$out" | format
    elif [[ -f $JOBCOMP ]]; then
        # The last record of this job, or of each task of this array: a requeued job has several.
        task=""
        [[ $id == *_* ]] && task=${id#*_}
        grep -E "(^| )(JobId|ArrayJobId)=${id%%_*}( |$)" "$JOBCOMP" \
            | awk -v task="$task" '
                task != "" && $0 !~ ("(^| )ArrayTaskId=" task "( |$)") { next }
                { split($1, a, "="); if (!(a[2] in last)) order[++n] = a[2]; last[a[2]] = $0 }
                END { for (i = 1; i <= n; i++) print last[order[i]] }' \
            | format
    fi
done
exit 0
EOF
    sed -i "s|__JOBCOMP__|'$LOGS/jobcomp.txt'|" "$BASE/bin/sacct"
    chmod 0755 "$BASE/bin/sacct"

    cat >"$BASE/env.sh" <<EOF
# Written by slurm/local_cluster.sh. Use: source $BASE/env.sh
export LARGEMIM_SLURM_BASE=$BASE
export SLURM_CONF=$CONF
case ":\$PATH:" in *":$BASE/bin:"*) ;; *) export PATH="$BASE/bin:\$PATH" ;; esac
EOF
}

start_munged() {
    local d=$BASE/munge
    mkdir -p "$d/run"
    chmod 0755 "$d"  # every user of the socket needs x on the folders above it; the key stays 0600
    chmod 0755 "$d/run"
    if [[ ! -s $d/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$d/munge.key")
    fi
    chmod 0600 "$d/munge.key"
    # --force: a socket left by a crashed munged would otherwise stop it from starting.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$d/munge.key" --pid-file="$RUN/munged.pid" \
        --log-file="$LOGS/munged.log" --seed-file="$d/munged.seed" </dev/null >>"$LOGS/munged.log" 2>&1 \
        || { log_tails; die "munged did not start"; }
}

wait_for_pidfile() {
    local pidfile=$1 name=$2 t
    for ((t = 0; t < 100; t++)); do
        our_pid "$pidfile" "$name" >/dev/null && return 0
        sleep 0.1
    done
    log_tails
    die "$name did not start (no live pid in $pidfile); see the logs above, then run: $0 stop --base $BASE"
}

start_slurmd() {
    local node=$1 pid
    mkdir -p "$BASE/spool/$node"
    # Own host name and hosts file per node; the mount stays private to the namespace. slurmd forks
    # itself into the background, still inside the namespace, and writes its pid file.
    unshare --uts --mount --propagation private \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -f "$3" -N "$2"' \
        sh "$BASE/etc/hosts" "$node" "$CONF" </dev/null >>"$LOGS/slurmd.$node.log" 2>&1 \
        || { log_tails; die "slurmd for $node did not start"; }
    wait_for_pidfile "$RUN/slurmd.$node.pid" slurmd
    pid=$(our_pid "$RUN/slurmd.$node.pid" slurmd)
    # Remember the node's namespace so stop can find job processes even if this slurmd is gone.
    readlink "/proc/$pid/ns/uts" >"$RUN/slurmd.$node.ns"
}

wait_until_idle() {
    local t states idle
    for ((t = 0; t < 600; t++)); do
        states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null || true)
        idle=$(grep -cE ' idle$' <<<"$states" || true)
        [[ $idle -ge $NODES ]] && return 0
        sleep 0.1
    done
    echo "local_cluster: sinfo after 60 s:" >&2
    echo "$states" >&2
    log_tails
    die "nodes did not become idle within 60 s; see the logs above (in $LOGS), then run: $0 stop --base $BASE"
}

cmd_start() {
    local t0 running=0 total=0 name pidfile i
    t0=$EPOCHREALTIME
    while read -r name pidfile; do
        total=$((total + 1))
        our_pid "$pidfile" "$name" >/dev/null && running=$((running + 1))
    done < <(daemons)
    if [[ -d $RUN && $running -eq $total && $total -gt 0 ]]; then
        if [[ $(cat "$RUN/nodes") != "$NODES" ]]; then
            die "already running with $(cat "$RUN/nodes") nodes under $BASE; run '$0 stop --base $BASE' first"
        fi
        if ! write_config check; then
            die "running under $BASE with another slurm.conf than this script writes (an older version: no 'urgent' partition?); run '$0 stop --base $BASE' and start again"
        fi
        write_tools  # refresh env.sh and the sacct stand-in; the daemons are left alone
        log "already running under $BASE ($NODES nodes); use: source $BASE/env.sh"
        return 0
    fi
    if [[ $running -gt 0 ]]; then
        log "partly running ($running of $total daemons); stopping it first"
        cmd_stop
    fi

    [[ $(id -u) -eq 0 ]] || die "start needs root (slurmd runs in its own namespaces)"
    local port
    for ((port = PORT; port <= PORT + NODES; port++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port on 127.0.0.1 is taken (another cluster?); pick other ports with LARGEMIM_SLURM_PORT=N (uses N..N+nodes)"
        fi
    done
    install_packages
    mkdir -p "$BASE" "$RUN" "$LOGS" "$BASE/state/slurmctld" "$BASE/spool"
    rm -f "$RUN"/*.pid "$RUN"/*.ns
    echo "$NODES" >"$RUN/nodes"
    write_config
    write_tools

    start_munged
    wait_for_pidfile "$RUN/munged.pid" munged
    # Job state is kept across restarts, so job ids keep growing (a reused id could make submitit read
    # a stale result). stop cancels all jobs, so nothing old is running again.
    slurmctld -f "$CONF" </dev/null >>"$LOGS/slurmctld.log" 2>&1 || { log_tails; die "slurmctld did not start"; }
    wait_for_pidfile "$RUN/slurmctld.pid" slurmctld
    for ((i = 1; i <= NODES; i++)); do
        start_slurmd "n$i"
    done
    wait_until_idle

    log "started $NODES nodes (n1..n$NODES, partitions debug and urgent, which preempts debug jobs) in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
    sinfo
    cat <<EOF

Use it:    source $BASE/env.sh      # SLURM_CONF, and a sacct stand-in first on PATH
           sbatch --nodes 2 --ntasks-per-node 1 --wrap 'srun hostname'
Logs:      $LOGS/
Stop it:   $0 stop --base $BASE
EOF
}

# ---------------------------------------------------------------- stop
cmd_stop() {
    local name pidfile pid ids node ns nspids slurmds=() others=() t any=0
    if [[ ! -d $RUN ]]; then
        log "nothing running under $BASE"
        return 0
    fi
    # Cancel jobs while the controller is still there, so no job is recovered on the next start.
    if pid=$(our_pid "$RUN/slurmctld.pid" slurmctld) && command -v squeue >/dev/null; then
        ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for ((t = 0; t < 100; t++)); do
                [[ -z $(squeue -h -o %i -t PD,R,CG,S,CF,RQ 2>/dev/null || true) ]] && break
                sleep 0.1
            done
        fi
    fi
    while read -r name pidfile; do
        if pid=$(our_pid "$pidfile" "$name"); then
            any=1
            if [[ $name == slurmd ]]; then slurmds+=("$pid"); else others+=("$pid"); fi
        fi
    done < <(daemons)

    # Nodes first: slurmd, then whatever is still alive in their namespaces (slurmstepd and job
    # processes are double-forked away from slurmd, so they are found by namespace, not by parent).
    terminate 10 "${slurmds[@]}" || echo "local_cluster: warning: a slurmd did not exit" >&2
    for ns in "$RUN"/slurmd.*.ns; do
        [[ -f $ns ]] || continue
        mapfile -t nspids < <(pids_in_ns "$(cat "$ns")")
        if [[ ${#nspids[@]} -gt 0 ]]; then
            any=1
            node=${ns#"$RUN"/slurmd.}
            log "killing ${#nspids[@]} leftover process(es) of node ${node%.ns}"
            terminate 5 "${nspids[@]}" || echo "local_cluster: warning: processes of ${node%.ns} did not exit" >&2
        fi
        # Keep the record while anything is left in the namespace, so that the next stop finds it.
        if [[ -z $(pids_in_ns "$(cat "$ns")") ]]; then rm -f "$ns"; fi
    done
    # Then the controller, then munged (the others authenticate through it until they are gone).
    local ctld=() mun=()
    for pid in "${others[@]}"; do
        if [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *slurmctld* ]]; then ctld+=("$pid"); else mun+=("$pid"); fi
    done
    terminate 15 "${ctld[@]}" || echo "local_cluster: warning: slurmctld did not exit" >&2
    terminate 10 "${mun[@]}" || echo "local_cluster: warning: munged did not exit" >&2
    rm -f "$RUN"/*.pid
    if [[ $any -eq 1 ]]; then log "stopped (files kept under $BASE)"; else log "nothing running under $BASE"; fi
}

# ---------------------------------------------------------------- status
cmd_status() {
    local name pidfile pid dead=0 ctld=0 node
    if [[ ! -d $RUN ]]; then
        log "no cluster under $BASE"
        return 3
    fi
    while read -r name pidfile; do
        node=$(basename "$pidfile" .pid)
        if pid=$(our_pid "$pidfile" "$name"); then
            printf '%-14s running  pid %s\n' "$node" "$pid"
            if [[ $name == slurmctld ]]; then ctld=1; fi
        else
            printf '%-14s stopped\n' "$node"
            dead=1
        fi
    done < <(daemons)
    if [[ $ctld -eq 1 ]]; then
        echo
        sinfo || true
        echo
        squeue || true
    fi
    echo
    echo "logs: $LOGS/    env: source $BASE/env.sh"
    [[ $dead -eq 0 ]] || return 3
}

case $CMD in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
