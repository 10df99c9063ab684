#!/usr/bin/env bash
# Tokenizer pre-training (megarec/train_tokenizer.py, e.g. UTGRec on several domains) on SLURM;
# default 2 nodes x 8 GPUs = 16 ranks:
#
#   sbatch slurm/pretrain_tokenizer.sh CONFIG.yaml [--key value ...]
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 --time=12:00:00 -p gpu -A myproj slurm/pretrain_tokenizer.sh ...
#
# --cpus-per-task: cores per rank for its DataLoader workers (data.num_workers <= cpus - 1).
# One rank per GPU; CPU ranks (--ntasks-per-node of them) when the allocation has no GPUs.
# Output in runs/<job name>-<job id>/ (job.log, checkpoints/, model/, tb/, metrics.json).
# Preemption: SIGUSR1 300 s before the end (change with --signal=B:USR1@<s>) -> checkpoint,
# requeue, resume. The launch logic is in slurm/_launch.sh; see docs/README_slurm.md.
#SBATCH --job-name=pretrain_tokenizer
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

ENTRY=megarec.train_tokenizer   # same flags as train_rec.py: --config, --train.run_dir, --resume
RUN_DIR_KEY=--train.run_dir
RESUME_FLAG=--resume

# In a batch job this file runs from SLURM's spool folder: find slurm/ from the submitted path.
script=$(scontrol show job "${SLURM_JOB_ID:?run through sbatch}" -o | grep -o 'Command=[^ ]*' | cut -d= -f2- || true)
SLURM_DIR=${MEGAREC_SLURM_DIR:-$(dirname "${script:-$SLURM_SUBMIT_DIR/slurm/x}")}
source "$SLURM_DIR/_launch.sh"
