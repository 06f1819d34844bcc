#!/bin/bash
# Linear evaluation of a pretrained backbone, one task per GPU (one GPU is plenty). Submit from
# the repository root; every argument after the script name goes to linear_eval.py:
#     sbatch sbatch/linear_eval.sh --ckpt runs/simclr-1234/last.pt
#     sbatch sbatch/linear_eval.sh --ckpt runs/simclr-1234/backbone.pt --mode fast
# Results: results.json in a linear_eval/ folder beside the checkpoint (linear_eval_fast/ with
# --mode fast; or OUTPUT_DIR=...). The time-limit signal saves the probe and requeues the job,
# which resumes from there, as in simclr.sh.
#
# Change for your cluster: the lines marked CHANGE (partition, account, the environment line), and
# in the #SBATCH lines GPUs (--gpus-per-node and --ntasks-per-node stay equal), CPUs per task, time.
# CPU-only partition: sbatch --gpus-per-node=0 --cpus-per-task=4 sbatch/linear_eval.sh --device cpu ...
#SBATCH --job-name=linear_eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# CHANGE: #SBATCH --partition=gpu
# CHANGE: #SBATCH --account=myproject
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f linear_eval.py ] || { echo "error: no linear_eval.py in $PWD: submit from the repository root" \
    "(cd there, then sbatch sbatch/linear_eval.sh)" >&2; exit 1; }
# CHANGE: module load pytorch-gpu/py3/2.3.0    (or: source ~/venvs/ssl/bin/activate)
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun 22.05 to 23.02 do not inherit --cpus-per-task
echo "job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array element ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}"
srun --kill-on-bad-exit=1 python -u linear_eval.py ${OUTPUT_DIR:+--output-dir "$OUTPUT_DIR"} \
    --workers $(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 )) "$@"
