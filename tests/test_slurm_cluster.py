"""The sbatch scripts on a real SLURM cluster started on this machine (tests/slurm_cluster.py):
every method runs to completion with CPU overrides, a 2-task job trains with the process group
built from SLURM's variables, and `scontrol requeue` or the time-limit signal (--signal) lead to a
saved checkpoint, a requeue and a resumed job that finishes, with every step logged once.
Skipped only where SLURM is not installed (`sbatch` absent); CI installs it."""
import csv
import fcntl
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import METHODS, REPO, load
from slurm_cluster import Cluster

pytestmark = [pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="SLURM is not installed (no sbatch): apt-get install slurmctld slurmd "
                                        "slurm-client munge to run these tests"),
              pytest.mark.xdist_group("slurm")]  # one cluster: these tests run in one pytest-xdist worker

# The GPU request of the scripts, overridden for this CPU-only node (as the README shows).
CPU = ["--partition=debug", "--gres=none", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=10"]
TINY = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "16",
        "--batch-size", "32", "--log-every", "1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster on the machine at a time (its daemons, ports and munged are the machine's): the
    xdist_group keeps these tests in one worker, except with pytest 9.2 (pytest-xdist issue 1386:
    the group is silently lost) or in two test runs at once; a worker then waits for the other's."""
    with open(Path(tempfile.gettempdir()) / "ssl-tests-slurm-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after stop()
        c = Cluster(tmp_path_factory.mktemp("slurm"))
        try:
            yield c.start()
        finally:
            c.stop()


@pytest.fixture
def submit_dir(tmp_path):
    for name in ("simclr.py", "byol.py", "barlow.py", "dino.py", "linear_eval.py", "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "sbatch", tmp_path / "sbatch")
    (tmp_path / "logs").mkdir()
    return tmp_path


def steps_logged(path):
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["kind"] == "step"]


def test_every_sbatch_script_runs_to_completion(cluster, submit_dir):
    jobs = {}
    for method in ("simclr", "byol", "barlow", "dino"):
        jobs[method] = cluster.submit(*CPU, "--ntasks-per-node=1", f"sbatch/{method}.sh", *TINY,
                                      *METHODS[f"{method}.py"], "--epochs", "1", "--knn-every", "1", cwd=submit_dir)
    for method, job in jobs.items():
        info = cluster.wait(job)
        log = (submit_dir / "logs" / f"{method}-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", log
        run = submit_dir / "runs" / f"{method}-{job}"
        assert {p.name for p in run.iterdir()} == {"args.json", "backbone.pt", "last.pt", "metrics.csv"}
        assert load(run / "last.pt")["step"] == 4 and "knn" in log and "done at step 4" in log
    job = cluster.submit(*CPU, "--ntasks-per-node=1", "sbatch/linear_eval.sh", "--ckpt",
                         f"runs/simclr-{jobs['simclr']}/backbone.pt", "--mode", "fast", "--epochs", "1",
                         *TINY, cwd=submit_dir)
    assert cluster.wait(job)["JobState"] == "COMPLETED"
    assert (submit_dir / "runs" / f"simclr-{jobs['simclr']}" / "linear_eval_fast" / "results.json").exists()


def test_scontrol_requeue_of_a_two_task_job_resumes_and_finishes(cluster, submit_dir):
    """2 tasks (srun, gloo, rank and world size from SLURM); `scontrol requeue` sends SIGTERM to
    the tasks: they save, and SLURM starts the job again under the same id, which resumes."""
    job = cluster.submit(*CPU, "--ntasks-per-node=2", "sbatch/simclr.sh", *TINY, "--epochs", "4",
                         "--knn-every", "0", cwd=submit_dir)
    log = submit_dir / "logs" / f"simclr-{job}.out"
    cluster.wait(job, states=("RUNNING",), timeout=60)
    wait_for_text(log, "epoch 0 step 3/16", cluster, job)
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait(job, timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "2 process(es)" in text and "SIGTERM: stopped at step" in text and "resumed from" in text
    assert steps_logged(submit_dir / "runs" / f"simclr-{job}" / "metrics.csv") == list(range(1, 17))


def test_time_limit_signal_saves_requeues_and_resumes(cluster, submit_dir):
    """--time=1 with --signal=USR1@20: SLURM signals every task 10-40 s after the start (its timer
    ticks every 30 s); the run saves, requeues itself and exits 0; the requeued job resumes. The
    work (100 steps, over a minute on one core here) outlasts the first signal; the requeued job
    gets a longer time limit, so that it finishes without being signalled again."""
    job = cluster.submit(*[a for a in CPU if not a.startswith("--time")], "--time=1", "--signal=USR1@20",
                         "--ntasks-per-node=1", "sbatch/simclr.sh", *TINY, "--epochs", "25", "--knn-every", "0",
                         cwd=submit_dir)
    log = submit_dir / "logs" / f"simclr-{job}.out"
    wait_for_text(log, f"requeued SLURM job {job}", cluster, job)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    info = cluster.wait(job, timeout=540)  # 1-2 min alone; over 5 on a machine busy with other work
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "SIGUSR1: stopped at step" in text and f"requeued SLURM job {job}" in text and "resumed from" in text
    assert steps_logged(submit_dir / "runs" / f"simclr-{job}" / "metrics.csv") == list(range(1, 101))


def test_a_time_limit_signal_in_a_job_array_requeues_that_element_only(cluster, submit_dir):
    """A sweep, as a job array of 2: element 0 is cancelled, then element 1, whose job id is the array's,
    gets the time-limit signal. It requeues itself alone; `scontrol requeue <its job id>` requeued the
    whole array, and the cancelled element came back and trained on."""
    array = cluster.submit(*CPU, "--array=0-1", "--ntasks-per-node=1", "sbatch/simclr.sh", *TINY, "--epochs", "50",
                           "--knn-every", "0", cwd=submit_dir)
    first, last = f"{array}_0", f"{array}_1"
    for element in (first, last):
        cluster.wait(element, states=("RUNNING",), timeout=60)
    log = submit_dir / "logs" / f"simclr-{cluster.job(last)['JobId']}.out"
    wait_for_text(log, "epoch 0 step 2/", cluster, last)
    cluster.run("scancel", first)
    assert cluster.wait(first, timeout=60)["JobState"] == "CANCELLED"
    cluster.run("scancel", "--signal=USR1", last)
    wait_for_text(log, "requeued SLURM job", cluster, last)
    time.sleep(2)
    assert cluster.job(first)["JobState"] == "CANCELLED" and cluster.job(last)["Restarts"] == "1", log.read_text()
    assert f"requeued SLURM job {last}\n" in log.read_text()
    assert f"job {cluster.job(last)['JobId']} (array element {last})" in log.read_text()
    cluster.run("scancel", last)
    cluster.wait(last, timeout=120)


def wait_for_text(path, text, cluster, job, timeout=120):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path} after {timeout} s: {cluster.job(job)}")
