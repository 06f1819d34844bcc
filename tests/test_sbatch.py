"""The sbatch scripts, run by bash with a fake `srun` that starts the task as SLURM would (one
task, SLURM variables set): argument pass-through, output folder keyed by the job id, workers
from --cpus-per-task, and the same folder reused by a requeued job. The real-cluster tests start
slurmctld/slurmd themselves (see test_slurm_cluster.py when present)."""
import json
import shutil
import subprocess

import pytest

from conftest import METHODS, REPO, clean_env, load

FAKE_SRUN = """#!/bin/bash
# Drop srun's own options, then run the command as task 0 of a 1-task step.
while [[ "$1" == -* ]]; do shift; done
export SLURM_STEP_ID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1
echo "srun cpus=$SRUN_CPUS_PER_TASK" >&2
exec "$@"
"""


@pytest.fixture
def submit_dir(tmp_path):
    for name in ("simclr.py", "byol.py", "barlow.py", "dino.py", "linear_eval.py", "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "sbatch", tmp_path / "sbatch")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    return tmp_path


def sbatch_env(submit_dir, job_id):
    return clean_env(PATH=f"{submit_dir / 'bin'}:{clean_env()['PATH']}", SLURM_JOB_ID=str(job_id),
                     SLURM_SUBMIT_DIR=str(submit_dir), SLURM_CPUS_PER_TASK="3", SLURM_JOB_NODELIST="localhost")


def test_simclr_sbatch_script(submit_dir):
    tiny = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "16",
            "--batch-size", "32", "--epochs", "1", "--knn-every", "0", "--log-every", "1"]
    env = sbatch_env(submit_dir, 4321)
    # Started from elsewhere (SLURM runs a spooled copy of the script): it must cd to the submit dir.
    proc = subprocess.run(["bash", submit_dir / "sbatch" / "simclr.sh", *tiny, "--max-steps", "1"],
                          cwd=submit_dir / "bin", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = submit_dir / "runs" / "simclr-4321"
    args = json.loads((out / "args.json").read_text())
    assert args["max_steps"] == 1 and args["workers"] == 2 and "srun cpus=3" in proc.stderr
    # The requeued job (same id) runs the script again and resumes in the same folder.
    proc = subprocess.run(["bash", "sbatch/simclr.sh", *tiny, "--max-steps", "2"], cwd=submit_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "resumed from runs/simclr-4321/last.pt at step 1" in proc.stdout
    assert load(out / "last.pt")["step"] == 2


def test_an_array_element_names_itself_in_its_log(submit_dir):
    """A sweep's element: its log's first line gives its array name (J_i, as squeue shows it) beside its
    job id, which names its folder; a plain job's line is as before (set -u: no unset variable read)."""
    tiny = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-size", "64", "32", "--image-size", "8",
            "--batch-size", "32", "--epochs", "1", "--knn-every", "0", "--max-steps", "1"]
    for env, first in ((dict(SLURM_ARRAY_JOB_ID="14", SLURM_ARRAY_TASK_ID="0"), "job 15 (array element 14_0) "),
                       ({}, "job 15 (restart 0) ")):
        proc = subprocess.run(["bash", "sbatch/simclr.sh", *tiny, "--output-dir", f"runs/{len(env)}"], cwd=submit_dir,
                              env={**sbatch_env(submit_dir, 15), **env}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith(first), proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow", "dino", "linear_eval"])
def test_sbatch_script_submitted_from_elsewhere_says_where_to_submit(submit_dir, method):
    """sbatch from another folder: python would not find the script (and SLURM writes the log to
    that folder's logs/). One line saying where to submit from, and a failed job."""
    (submit_dir / "elsewhere").mkdir()
    env = dict(sbatch_env(submit_dir, 9), SLURM_SUBMIT_DIR=str(submit_dir / "elsewhere"))
    proc = subprocess.run(["bash", submit_dir / "sbatch" / f"{method}.sh"], cwd=submit_dir / "elsewhere", env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: no {method}.py in {submit_dir / 'elsewhere'}: submit from the repository root (cd there, then "
        f"sbatch sbatch/{method}.sh)\n")


def test_linear_eval_sbatch_script(submit_dir):
    env = sbatch_env(submit_dir, 55)
    tiny = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "16",
            "--batch-size", "32", "--epochs", "1"]
    subprocess.run(["bash", "sbatch/simclr.sh", *tiny, "--knn-every", "0", "--max-steps", "1"], cwd=submit_dir,
                   env=env, check=True, capture_output=True, timeout=300)
    # Started from elsewhere, as SLURM runs its spooled copy: it cds to the submit dir (the relative --ckpt is there).
    proc = subprocess.run(["bash", submit_dir / "sbatch" / "linear_eval.sh", "--ckpt", "runs/simclr-55/backbone.pt",
                           "--mode", "fast", *tiny], cwd=submit_dir / "bin", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top1" in json.loads((submit_dir / "runs" / "simclr-55" / "linear_eval_fast" / "results.json").read_text())


@pytest.mark.parametrize("method", ["byol", "barlow", "dino"])
def test_other_method_sbatch_scripts(submit_dir, method):
    tiny = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "16",
            "--batch-size", "32", "--epochs", "1", "--knn-every", "0", "--max-steps", "1", *METHODS[f"{method}.py"]]
    proc = subprocess.run(["bash", f"sbatch/{method}.sh", *tiny], cwd=submit_dir, env=sbatch_env(submit_dir, 8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load(submit_dir / "runs" / f"{method}-8" / "last.pt")["method"] == method
    # workers from --cpus-per-task (3: 2 workers and the training process), srun told the CPUs per task
    assert json.loads((submit_dir / "runs" / f"{method}-8" / "args.json").read_text())["workers"] == 2
    assert "srun cpus=3" in proc.stderr


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow", "dino", "linear_eval"])
def test_every_script_asks_slurm_for_the_warning_the_requeue_and_one_log(method):
    """What the fake srun cannot see: the time-limit warning to the tasks (USR1 without B:, which would
    signal only the batch shell and kill the job), a job that may be requeued (clusters where
    JobRequeue=0 refuse scontrol requeue otherwise), a log appended to by the requeued job (not
    truncated), the whole step stopped when one task fails (not the others left waiting), and
    python's output unbuffered (the log shows the last step before a kill)."""
    lines = (REPO / "sbatch" / f"{method}.sh").read_text().splitlines()
    sbatch = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    assert {"--signal=USR1@120", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"} <= sbatch
    assert [line.split()[:4] for line in lines if line.startswith("srun ")] == [
        ["srun", "--kill-on-bad-exit=1", "python", "-u"]]
