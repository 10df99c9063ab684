# shellcheck shell=bash
# Shared launch logic of the sbatch scripts in slurm/ (sourced, never run on its own).
#
# The sourcing script sets, then sources this file with its own arguments "CONFIG [--key value ...]":
#   ENTRY         python module to run on every rank (e.g. megarec.train_rec)
#   RUN_DIR_KEY   the entry point's override key for its output folder (e.g. --train.run_dir)
#   RESUME_FLAG   the entry point's flag to continue from the checkpoints in that folder (e.g. --resume)
#
# What it does, in a SLURM batch job:
#   1. run folder runs/<job name>-<job id>/ (or $MEGAREC_RUN_DIR); this script's output is
#      appended to <run folder>/job.log as well as to SLURM's own output file;
#   2. rank layout from the allocation: one rank per GPU of each node (SLURM_GPUS_ON_NODE), or
#      --ntasks-per-node CPU ranks when the allocation has no GPUs; rendezvous on the first node
#      (its NodeAddr), port from the job id;
#   3. one `srun` task per rank (slurm/_task.sh sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* and
#      checks that the node sees the run folder); every output line is prefixed with its rank;
#   4. preemption: SIGUSR1 (#SBATCH --signal=B:USR1@<s>) is forwarded to the ranks, which
#      checkpoint at the next step boundary and exit 75; the job then requeues itself
#      (scontrol requeue), at most $MEGAREC_MAX_REQUEUES times; a requeued job finds the
#      checkpoint in its run folder and adds RESUME_FLAG by itself. SIGTERM (time limit,
#      scancel) also checkpoints if KillWait leaves time, but does not requeue.
#
# Environment knobs (export before sbatch; sbatch passes the environment on):
#   MEGAREC_RUN_DIR             run folder (default runs/<job name>-<job id>); reuse one to continue it
#   MEGAREC_PYTHON              python executable (default: python)
#   MEGAREC_MAX_REQUEUES        requeues allowed per job (default 10)
#   MEGAREC_MASTER_PORT         rendezvous port (default 20000 + job id % 20000)
#   MEGAREC_SHARED_CHECK_S      seconds a rank waits for the run folder marker (default 30)
#   MEGAREC_PREEMPT_CHECK_EVERY steps between the ranks' collective preemption checks (default 1)
#   MEGAREC_SRUN_WAIT           seconds the other ranks get once one has exited (default 60)
set -euo pipefail

die() { echo "megarec-slurm: error: $*" >&2; exit 2; }

: "${ENTRY:?set ENTRY before sourcing _launch.sh}"
: "${RUN_DIR_KEY:?set RUN_DIR_KEY before sourcing _launch.sh}"
: "${RESUME_FLAG:?set RESUME_FLAG before sourcing _launch.sh}"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "run this through sbatch (no SLURM_JOB_ID in the environment)"
[[ $# -ge 1 && "$1" != --* ]] || die "usage: sbatch ${script:-slurm/<script>.sh} CONFIG.yaml [--key value ...]"
CONFIG=$1
shift
[[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist (relative paths start in $(pwd))"

SLURM_DIR=${SLURM_DIR:?the sourcing script sets SLURM_DIR}
PYTHON=${MEGAREC_PYTHON:-python}
MAX_REQUEUES=${MEGAREC_MAX_REQUEUES:-10}
RESTARTS=${SLURM_RESTART_COUNT:-0}
"$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$ENTRY" \
    || die "python module $ENTRY not found by $PYTHON (pip install -e . first, or set MEGAREC_PYTHON)"

# ---------------------------------------------------------------- 1. run folder and log
RUN_DIR=$(realpath -m "${MEGAREC_RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}")
mkdir -p "$RUN_DIR"
# tee ignores the preemption signals (scancel --full signals the batch script's children too)
exec > >(trap '' USR1 TERM INT; exec tee -a "$RUN_DIR/job.log") 2>&1
TEE_PID=$!
flush_log() { exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || true; }
trap flush_log EXIT
echo "=== $(date -Is) job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $RESTARTS on $SLURM_JOB_NODELIST; run folder $RUN_DIR"

# Preemption signals: remember them, and forward them to the ranks once srun runs.
SIGNALLED=""
SRUN_PID=""
on_signal() {
    SIGNALLED=$1
    echo "=== $(date -Is) batch script got SIG$1: forwarding it to the ranks (checkpoint at the next step)"
    [[ -n "$SRUN_PID" ]] && kill -s "$1" "$SRUN_PID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# ---------------------------------------------------------------- 2. rank layout
NNODES=${SLURM_NNODES:-1}
gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z "$gpus" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    gpus=${SLURM_GPUS_PER_NODE##*:}          # "a100:8" -> 8
fi
gpus=${gpus:-0}
if (( gpus > 0 )); then
    RANKS_PER_NODE=$gpus
    tasks=${SLURM_NTASKS_PER_NODE:-$gpus}
    (( tasks == gpus )) || die "the allocation has $gpus GPUs per node but --ntasks-per-node=$tasks: one rank per" \
        "GPU needs both flags equal (e.g. --gpus-per-node=4 --ntasks-per-node=4)"
else
    RANKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
WORLD=$(( NNODES * RANKS_PER_NODE ))
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" -o | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
export MASTER_PORT=${MEGAREC_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export MEGAREC_RANKS_PER_NODE=$RANKS_PER_NODE
echo "ranks: $NNODES nodes x $RANKS_PER_NODE = $WORLD ($([[ $gpus -gt 0 ]] && echo "one per GPU" || echo "CPU ranks," \
    "DS_ACCELERATOR=$DS_ACCELERATOR")); rendezvous $MASTER_ADDR:$MASTER_PORT"

# ---------------------------------------------------------------- shared storage marker
# Every rank must find this file with this token (slurm/_task.sh checks it before python starts).
export MEGAREC_RUN_DIR=$RUN_DIR
export MEGAREC_SHARED_TOKEN="$SLURM_JOB_ID.$RESTARTS.$(hostname).$$.$RANDOM$RANDOM"
export MEGAREC_BATCH_HOST=$(hostname)
echo "$MEGAREC_SHARED_TOKEN" > "$RUN_DIR/.shared_storage_check"

# ---------------------------------------------------------------- 3. the command
args=(--config "$CONFIG" "$@" "$RUN_DIR_KEY" "$RUN_DIR")
if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
    args+=("$RESUME_FLAG")                   # a requeued (or continued) job resumes by itself
    echo "resuming from $RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest")"
fi
export MEGAREC_PREEMPT_SIGNALS=USR1,TERM     # the ranks checkpoint and exit 75 on these
# --wait, not --kill-on-bad-exit: preempted ranks all exit 75 within a moment, and killing the
# slower ones would turn that status into 143; a rank that crashes still ends the others (after 60 s).
step=(--nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$RANKS_PER_NODE")
(( gpus > 0 )) && step+=(--gpus-per-node="$gpus")           # every GPU of the node visible to its ranks
# srun does not take --cpus-per-task from sbatch since SLURM 22.05: pass it on
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
cmd=(srun --label --kill-on-bad-exit=0 --wait="${MEGAREC_SRUN_WAIT:-60}" "${step[@]}"
     "$SLURM_DIR/_task.sh" "$PYTHON" -u -m "$ENTRY" "${args[@]}")
echo "+ $(printf '%q ' "${cmd[@]}")"

# ---------------------------------------------------------------- 4. run, forward signals, requeue
"${cmd[@]}" &
SRUN_PID=$!
[[ -n "$SIGNALLED" ]] && { kill -s "$SIGNALLED" "$SRUN_PID" 2>/dev/null || true; }   # a signal before srun
while true; do
    set +e
    wait "$SRUN_PID"
    rc=$?
    set -e
    # a trapped signal interrupts `wait` (status > 128) while srun goes on: wait again
    if (( rc > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    break
done
trap - USR1 TERM
echo "=== $(date -Is) ranks exited with status $rc"

if (( rc == 0 )); then
    exit 0
fi
if [[ "$SIGNALLED" == TERM ]]; then
    echo "terminated (time limit or scancel): not requeued; continue this run with" \
         "MEGAREC_RUN_DIR=$RUN_DIR sbatch ... (it resumes from its latest checkpoint)"
    exit "$rc"
fi
if (( rc == 75 )) || [[ "$SIGNALLED" == USR1 ]]; then
    if (( RESTARTS >= MAX_REQUEUES )); then
        echo "preempted, but not requeued: this job was already requeued $RESTARTS times (MEGAREC_MAX_REQUEUES=$MAX_REQUEUES)"
        exit "$rc"
    fi
    echo "$(date -Is) job $SLURM_JOB_ID restart $RESTARTS: preempted (status $rc${SIGNALLED:+, SIG$SIGNALLED}), requeued" \
        >> "$RUN_DIR/requeues.log"
    echo "=== preempted: requeueing job $SLURM_JOB_ID (requeue $(( RESTARTS + 1 )) of at most $MAX_REQUEUES)"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0                               # SLURM ends this script and queues the job again
    fi
    echo "scontrol requeue failed (submitted with --no-requeue?): continue this run with" \
         "MEGAREC_RUN_DIR=$RUN_DIR sbatch ..."
    exit "$rc"
fi
echo "failed with status $rc: not requeued"
exit "$rc"
