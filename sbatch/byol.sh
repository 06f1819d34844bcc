#!/bin/bash
# BYOL on one node, one task per GPU. Submit from the repository root; every argument after the
# script name goes to byol.py:
#     sbatch sbatch/byol.sh
#     sbatch sbatch/byol.sh --epochs 200 --dataset stl10 --data-dir $SCRATCH/stl10
# Time limit and preemption: SLURM sends SIGUSR1 to every task 120 s before the limit (--signal
# without "B:", because the tasks are started by srun); byol.py then saves last.pt, requeues
# this job (it keeps its job id) and exits. The requeued job runs this script again, finds
# runs/byol-<job id>/last.pt and resumes. scancel sends SIGTERM: it saves and stops for good.
# A job that ended (scancel, failed, out of time) resumes in a new job given its folder and the
# same arguments as before (they are not read back from the folder):
#     OUTPUT_DIR=runs/byol-<job id> sbatch sbatch/byol.sh <same arguments>
# Keep --time well above the 120 s of warning (10 minutes at least).
#
# Change for your cluster: the lines marked CHANGE (partition, account, the environment line), and
# in the #SBATCH lines GPUs per node (--gpus-per-node and --ntasks-per-node must stay equal), CPUs
# per task (data workers + 1), time. Multi-node: raise --nodes; the global batch stays --batch-size, and the
# master address and port come from SLURM's variables. CPU-only partition, from the command line:
#     sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 sbatch/byol.sh --device cpu
#SBATCH --job-name=byol
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=20:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# CHANGE: #SBATCH --partition=gpu
# CHANGE: #SBATCH --account=myproject
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f byol.py ] || { echo "error: no byol.py in $PWD: submit from the repository root" \
    "(cd there, then sbatch sbatch/byol.sh)" >&2; exit 1; }
# CHANGE: module load pytorch-gpu/py3/2.3.0    (or: source ~/venvs/ssl/bin/activate)
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun 22.05 to 23.02 do not inherit --cpus-per-task
OUTPUT_DIR="${OUTPUT_DIR:-runs/byol-${SLURM_JOB_ID}}"
echo "job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array element ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: output in ${OUTPUT_DIR}"
srun --kill-on-bad-exit=1 python -u byol.py --output-dir "${OUTPUT_DIR}" \
    --workers $(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 )) "$@"
