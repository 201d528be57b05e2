# Shared by slurm/torchrun.sbatch and slurm/deepspeed.sbatch (sourced, not run): rendezvous variables,
# a signal-aware srun, and the requeue decision. Expects STOP_SIGNAL (e.g. USR1) and MAX_REQUEUES.
#
# The protocol, for a batch script submitted with  #SBATCH --signal=B:$STOP_SIGNAL@SECONDS  --requeue:
#  1. Slurm sends STOP_SIGNAL to this batch shell only (B:), SECONDS before the time limit (or an admin /
#     preemption script sends it with  scancel --batch --signal=USR1 JOBID).
#  2. The trap forwards it with  scancel --signal=$STOP_SIGNAL JOB (lm_job) : every process of the job's
#     steps gets it (srun's tasks and all their children), not this shell. The per-node launcher
#     (torchrun, deepspeed) was started with the signal ignored, so it keeps running; the ranks have
#     their own handler (checkpoint.stop_signals), agree on a step, save it and exit 0; the launcher then
#     exits 0 and srun returns.
#  3. At the end, local rank 0 on this node writes how the run ended to LARGEMIM_END_FILE (a node-local
#     path this script sets): "stopped STEP" (saved, stopped early) or "finished STEP". If the ranks
#     stopped early, the job is still RUNNING (a cancel makes it COMPLETING) and it has been requeued
#     fewer than MAX_REQUEUES times, this script runs  scontrol requeue : the same job id starts again
#     and the trainer resumes from the newest complete checkpoint.
# SIGTERM reaches the ranks from Slurm directly; they save and stop too (SIGTERM is in the default
# checkpoint.stop_signals). After scancel or at the time limit, this shell gets it as well and does not
# requeue. A preemption with a grace time SIGTERMs the steps only, keeps the job RUNNING (PreemptTime
# set) and would requeue it itself when the grace time ends; this script requeues at once instead, and
# also when the ranks could not save in time (the launchers kill them 30 s after a SIGTERM): the run
# resumes from its newest complete checkpoint either way.

lm_log() {
    echo "[largemim $(date +%H:%M:%S) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}] $*"
}

# The id that names this job alone: an array task's own ARRAYID_TASKID. For one task of an array, its
# SLURM_JOB_ID is the array's id, and scancel/scontrol given that would signal or requeue every task.
lm_job() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$SLURM_JOB_ID"
    fi
}

# MASTER_ADDR: the first host of the allocation. MASTER_PORT: from the job id, so a requeued job (same id)
# uses the same one, and two jobs sharing a node do not collide; 10000-29999, below Linux's ephemeral
# ports (32768-60999), which outgoing connections may already hold.
lm_rendezvous() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# OMP_NUM_THREADS (unless set): the task's CPUs shared by the node's ranks, at least 1.
lm_threads() {
    local ranks=$1 threads
    threads=$((${SLURM_CPUS_PER_TASK:-$ranks} / ranks))
    ((threads >= 1)) || threads=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
}

LM_SIGNALLED=""
LM_TERMINATED=""
LM_RESENDER=""

_lm_forward() {
    LM_SIGNALLED=1
    lm_log "got SIG$STOP_SIGNAL: forwarding it to the ranks (they save after the current step and stop)"
    scancel --signal="$STOP_SIGNAL" "$(lm_job)"
    # A rank still starting up has no handler yet and ignores the signal (it inherits the launcher's
    # "ignore"): say it again every 30 s until the step ends.
    if [[ -z $LM_RESENDER ]]; then
        (while sleep 30; do scancel --signal="$STOP_SIGNAL" "$(lm_job)" 2>/dev/null; done) &
        LM_RESENDER=$!
    fi
}

_lm_term() {
    LM_TERMINATED=1
    lm_log "got SIGTERM (cancel, time limit or preemption): the ranks save and stop; no requeue from here"
}

# lm_srun SRUN_ARGS... : run srun in the background and wait for it, handling the signals. Sets LM_STATUS.
# (bash runs a trap only after the command it waits on returns, so srun must not run in the foreground,
# and a wait interrupted by a trap has to be repeated.)
lm_srun() {
    trap _lm_forward "$STOP_SIGNAL"
    trap _lm_term TERM
    # Slurm 22.05-23.02: srun no longer takes --cpus-per-task from the job (restored in 23.11), so each
    # task (one launcher per node, and all of its ranks) would get 1 CPU under task/affinity or
    # task/cgroup binding. SRUN_CPUS_PER_TASK hands the job's value on (older srun ignores it).
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    fi
    # sbatch hands the submitting shell's environment on: tools/setup_env.sh's DS_ACCELERATOR=cpu would
    # keep a job with GPUs on the CPU.
    if [[ ${DS_ACCELERATOR:-} == cpu && -n ${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}${SLURM_GPUS_PER_NODE:-} ]]; then
        lm_log "unsetting DS_ACCELERATOR=cpu (from the submitting shell): this job has GPUs"
        unset DS_ACCELERATOR
    fi
    # sbatch hands on the submitting shell's TMPDIR, often a login node's per-session folder that compute
    # nodes lack: the end file (below) and the deepspeed template's hostfile would not be written.
    if [[ ! -d ${TMPDIR:-/tmp} || ! -w ${TMPDIR:-/tmp} ]]; then
        lm_log "TMPDIR=${TMPDIR} is not a writable folder here: using /tmp"
        export TMPDIR=/tmp
    fi
    # How the ranks' run ended, from local rank 0 of this node (largemim.launch.slurm_env.report_end).
    export LARGEMIM_END_FILE="${TMPDIR:-/tmp}/largemim-end-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
    LARGEMIM_END_HOST=$(uname -n)  # what the ranks' socket.gethostname() says on this node
    export LARGEMIM_END_HOST
    rm -f "$LARGEMIM_END_FILE"
    srun "$@" &
    local pid=$! status
    LM_STATUS=""
    while :; do
        wait "$pid"
        status=$?
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
    done
    wait "$pid" 2>/dev/null
    LM_STATUS=$?
    # 127: already collected by the wait above (srun ended on its own, not during a trap)
    if [[ $LM_STATUS -eq 127 ]]; then LM_STATUS=$status; fi
    if [[ -n $LM_RESENDER ]]; then kill "$LM_RESENDER" 2>/dev/null; fi
    lm_log "srun exited with $LM_STATUS"
}

# lm_show KIND NAME: the line of `scontrol show KIND NAME -o` that is NAME's own (an array job lists its
# tasks too); retried (a busy slurmctld times out now and then). Empty if scontrol cannot tell.
lm_show() {
    local head out try
    if [[ $1 == job ]]; then head="JobId=$2 "; else head="PartitionName=$2 "; fi
    for try in 1 2 3; do
        out=$(scontrol show "$1" -o "$2" 2>/dev/null | grep -m1 "^$head")
        if [[ -n $out ]]; then break; fi
        if ((try < 3)); then sleep 5; fi
    done
    echo "$out"
}

# lm_get LINE KEY: KEY's value in a line from lm_show (the first match).
lm_get() {
    grep -o " $2=[^ ]*" <<<" $1" | head -n 1 | cut -d= -f2-
}

# lm_finish: requeue this job, or exit with srun's status. Not after a SIGTERM to this shell (scancel, the
# time limit) or once the job has left RUNNING. Requeue if the ranks saved and stopped early (under the
# cap); if Slurm is preempting the job in REQUEUE mode (PreemptTime set: it would requeue the job itself
# at the end of the grace time, not once the job has ended; so not capped, and also when the ranks
# could not save); or, with no word from the ranks, if they exited 0 after the stop signal.
lm_finish() {
    local ended="" step="" job state preempt restarts
    if [[ -f $LARGEMIM_END_FILE ]]; then
        read -r ended step <"$LARGEMIM_END_FILE"
        rm -f "$LARGEMIM_END_FILE"
    fi
    if [[ -n $LM_TERMINATED ]]; then
        exit "$LM_STATUS"
    fi
    if [[ $ended == finished ]]; then
        if [[ -n $LM_SIGNALLED ]]; then lm_log "the run ended (step $step) before it could stop: nothing to requeue"; fi
        exit "$LM_STATUS"
    fi
    job=$(lm_show job "$SLURM_JOB_ID")  # asked once: the state and preemption below are of one moment
    state=$(lm_get "$job" JobState)
    preempt=$(lm_get "$job" PreemptTime)
    if [[ $state != RUNNING || -z $preempt || $preempt == None ]] \
        || [[ $(lm_get "$(lm_show partition "${SLURM_JOB_PARTITION:-}")" PreemptMode) != *REQUEUE* ]]; then
        preempt=""
    fi
    restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $ended == stopped ]]; then
        lm_log "the ranks saved step $step and stopped (srun exited with $LM_STATUS)"
    elif [[ -n $preempt ]]; then
        lm_log "preempted at $preempt; the ranks reported no save (srun exited with $LM_STATUS)"
    elif [[ -n $LM_SIGNALLED && $LM_STATUS -eq 0 ]]; then
        lm_log "no word from the ranks in $LARGEMIM_END_FILE (is this node's TMPDIR private to each step?); going by SIG$STOP_SIGNAL"
    else
        if [[ -n $LM_SIGNALLED ]]; then
            lm_log "the ranks exited with status $LM_STATUS after SIG$STOP_SIGNAL without saving: not requeueing"
        fi
        exit "$LM_STATUS"
    fi
    if [[ -z $state ]]; then
        lm_log "error: 'scontrol show job $SLURM_JOB_ID' did not answer: not requeued; submit again to continue"
        exit 1
    fi
    if [[ $state != RUNNING ]]; then
        lm_log "the job is $state (cancelled or ended by Slurm): not requeueing"
        exit 0
    fi
    if [[ -n $preempt ]]; then
        lm_log "requeueing (preempted: Slurm would requeue it at the end of the grace time, whatever MAX_REQUEUES); the run resumes from its newest complete checkpoint"
    elif ((restarts >= MAX_REQUEUES)); then
        lm_log "requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES; preemptions count too): not requeueing; submit again to continue"
        exit 1
    else
        lm_log "requeueing (requeue $((restarts + 1)) of at most $MAX_REQUEUES); the run resumes from its newest complete checkpoint"
    fi
    if ! scontrol requeue "$(lm_job)"; then
        if [[ $(lm_get "$(lm_show job "$SLURM_JOB_ID")" Restarts) -gt $restarts ]]; then
            lm_log "Slurm requeued the job itself"
            exit 0
        fi
        lm_log "error: 'scontrol requeue $SLURM_JOB_ID' failed: submit again to continue"
        exit 1
    fi
    exit 0
}
