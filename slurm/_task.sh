#!/usr/bin/env bash
# One rank of a job launched by slurm/_launch.sh: `srun ... slurm/_task.sh COMMAND...`.
#
# Turns SLURM's task variables into the torch.distributed environment (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_SIZE / LOCAL_WORLD_SIZE, NODE_RANK; MASTER_ADDR / MASTER_PORT come from the
# batch script), checks that this node sees the run folder the batch script wrote (shared
# storage), then execs COMMAND, so that signals reach python directly.
set -euo pipefail

export RANK=${SLURM_PROCID:?not started by srun}
export WORLD_SIZE=${SLURM_NTASKS:?not started by srun}
export LOCAL_RANK=${SLURM_LOCALID:?not started by srun}
export NODE_RANK=${SLURM_NODEID:-0}
export LOCAL_SIZE=${MEGAREC_RANKS_PER_NODE:-1}
export LOCAL_WORLD_SIZE=$LOCAL_SIZE

# Shared storage: the batch script wrote $MEGAREC_SHARED_TOKEN into the run folder. A node that
# does not see it (run folder on a node-local disk) would write checkpoints nobody can resume.
marker="${MEGAREC_RUN_DIR:?}/.shared_storage_check"
deadline=$(( SECONDS + ${MEGAREC_SHARED_CHECK_S:-30} ))   # network file systems may lag a little
until [[ -f "$marker" && "$(cat "$marker" 2>/dev/null)" == "${MEGAREC_SHARED_TOKEN:?}" ]]; do
    if (( SECONDS >= deadline )); then
        echo "megarec-slurm: error: rank $RANK on $(hostname) (node $NODE_RANK) does not see the run folder" \
             "$MEGAREC_RUN_DIR as written by the batch script on ${MEGAREC_BATCH_HOST:-the first node}" \
             "(missing or different $marker). Every node must read and write the same run folder:" \
             "put it on shared storage (set MEGAREC_RUN_DIR or submit from a shared directory)." >&2
        exit 3
    fi
    sleep 1
done

exec "$@"
