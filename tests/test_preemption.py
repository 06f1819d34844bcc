"""SIGUSR1 (time limit coming): save, requeue the SLURM job, exit 0. SIGTERM (scancel): save,
exit 143, no requeue. A fake `scontrol` on PATH records what the script asks of SLURM."""
import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import METHODS, REPO, TINY, Started, clean_env, load, run_script


@pytest.fixture
def fake_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir, tmp_path / "scontrol.log"


def start_and_signal(out, sig, env, script="simclr.py", extra=(), then=None):
    """Start a long run, send `sig` (then `then`) once it has trained a few steps, return (returncode, output)."""
    proc = Started(script, *TINY, "--epochs", "50", "--knn-every", "0", "--output-dir", out, *extra, env=env)
    proc.wait_for("epoch 0 step")  # the first progress line: training is under way
    proc.send_signal(sig)
    if then:
        proc.send_signal(then)
    return proc.wait(timeout=180), proc.output


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py", "dino.py"])
def test_sigusr1_saves_requeues_and_exits_0(tmp_path, fake_scontrol, script):
    bin_dir, log = fake_scontrol
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    code, output = start_and_signal(tmp_path / "run", signal.SIGUSR1, env, script, METHODS[script])
    assert code == 0, output
    assert "requeued SLURM job 4242" in output
    assert log.read_text().split() == ["requeue", "4242"]
    ckpt = load(tmp_path / "run" / "last.pt")
    assert 2 <= ckpt["step"] < 50 * 4 and not (tmp_path / "run" / "backbone.pt").exists()
    # The requeued job runs the same command and continues from the checkpoint.
    proc = run_script(script, *TINY, *METHODS[script], "--epochs", "50", "--knn-every", "0",
                      "--output-dir", tmp_path / "run", "--max-steps", ckpt["step"] + 2)
    assert f"at step {ckpt['step']}" in proc.stdout and load(tmp_path / "run" / "last.pt")["step"] == ckpt["step"] + 2


@pytest.mark.parametrize("script", ["simclr.py", "linear_eval.py"])
def test_an_array_element_requeues_itself_not_the_array(tmp_path, fake_scontrol, script):
    """In a job array the last element's job id is the array's id, and `scontrol requeue <that id>`
    requeued every element: cancelled and finished ones came back and trained on (a real SLURM 22.05).
    The element is requeued by its array name, ARRAYID_TASKID."""
    bin_dir, log = fake_scontrol
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="14", SLURM_ARRAY_JOB_ID="14",
                    SLURM_ARRAY_TASK_ID="2")
    if script == "simclr.py":
        code, output = start_and_signal(tmp_path / "run", signal.SIGUSR1, env)
    else:
        run_script("simclr.py", *TINY, "--epochs", "1", "--knn-every", "0", "--output-dir", tmp_path / "pre")
        proc = Started("linear_eval.py", "--ckpt", tmp_path / "pre" / "last.pt", "--device", "cpu", "--epochs", "50",
                       "--batch-size", "32", "--workers", "0", "--output-dir", tmp_path / "probe", env=env)
        proc.wait_for("epoch 0 step")
        proc.send_signal(signal.SIGUSR1)
        code, output = proc.wait(timeout=180), proc.output
    assert code == 0 and "requeued SLURM job 14_2" in output, output
    assert log.read_text().split() == ["requeue", "14_2"]


def test_main_called_from_a_notebook_gives_back_its_handlers_and_determinism(tmp_path):
    """main() called in a session that goes on (a notebook): its Preemption swallowed the session's next
    Ctrl-C and kept SIGTERM from stopping it, after a run and after an error line alike; --deterministic
    stayed on for the next run (which then trained so, and torch.empty filled every tensor with NaN).
    A notebook's %run of a script (sys.ps1 set) ignored SIGTERM and SIGUSR1 for the rest of the session."""
    flags = [*map(str, TINY), "--epochs", "1", "--knn-every", "0", "--max-steps", "2"]
    wrapper = tmp_path / "notebook.py"
    wrapper.write_text(textwrap.dedent(f"""
        import runpy, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import simclr
        def mine(*_): pass
        signal.signal(signal.SIGTERM, mine)
        def handlers(): return [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
        def main(*extra): simclr.main(simclr.get_args_parser().parse_args({flags!r} + list(extra)))
        before = handlers()
        main("--deterministic", "--output-dir", {str(tmp_path / "a")!r})
        print("after a run", handlers() == before, torch.are_deterministic_algorithms_enabled())
        try:
            main("--dataset", "imagefolder", "--data-dir", {str(tmp_path / "none")!r}, "--output-dir", "b")
        except SystemExit as e:
            print("after an error", handlers() == before, torch.are_deterministic_algorithms_enabled(), e)
        sys.argv, sys.ps1 = [{str(REPO / "simclr.py")!r}, *{flags!r}, "--output-dir", {str(tmp_path / "c")!r}], ">>> "
        runpy.run_path({str(REPO / "simclr.py")!r}, run_name="__main__")
        print("after %run", handlers() == before)
        """))
    out = run_script(wrapper).stdout
    assert "after a run True True" in out and "after an error True False error: --data-dir" in out, out
    assert "after %run True" in out, out


@pytest.mark.parametrize("first", [None, signal.SIGUSR1])
def test_sigterm_saves_and_exits_without_requeue(tmp_path, fake_scontrol, first):
    """Also after the time limit's SIGUSR1 (scancel in the same step): a cancelled job is not requeued."""
    bin_dir, log = fake_scontrol
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    code, output = start_and_signal(tmp_path / "run", first or signal.SIGTERM, env,
                                    then=signal.SIGTERM if first else None)
    assert code == 143, output
    assert not log.exists(), "SIGTERM must not requeue: scancel has to stop the job for good"
    assert load(tmp_path / "run" / "last.pt")["step"] >= 2


def test_a_failed_requeue_exits_1(tmp_path):
    """scontrol refuses (a cluster that forbids requeues, a slurmctld down): the job must not end
    COMPLETED, or an `afterok` dependency (linear_eval.sh) would start on an unfinished run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'slurm_requeue error: Requested operation is disabled' >&2\n"
                                      "exit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    code, output = start_and_signal(tmp_path / "run", signal.SIGUSR1, env)
    assert code == 1, output
    assert "error: could not requeue job 4242" in output
    # the job's id names its folder (runs/simclr-<job id> in the sbatch scripts): a new job needs this one's
    assert f"to resume, submit it again with --output-dir {tmp_path / 'run'} and the same arguments" in output
    assert load(tmp_path / "run" / "last.pt")["step"] >= 2


def test_sigusr1_outside_slurm_saves_and_exits_0(tmp_path):
    code, output = start_and_signal(tmp_path / "run", signal.SIGUSR1, clean_env())
    assert code == 0, output
    assert "requeue" not in output and (tmp_path / "run" / "last.pt").exists()


def test_linear_eval_sigusr1(tmp_path, pretrained, fake_scontrol):
    bin_dir, log = fake_scontrol
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77")
    proc = Started("linear_eval.py", "--ckpt", pretrained / "last.pt", "--device", "cpu", "--workers", "0",
                   "--batch-size", "32", "--epochs", "200", "--log-every", "2", "--output-dir", tmp_path / "le",
                   env=env)
    proc.wait_for("epoch 0 step")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, proc.output
    assert log.read_text().split() == ["requeue", "77"]
    assert load(tmp_path / "le" / "last.pt")["method"] == "linear_eval"
    assert not (tmp_path / "le" / "results.json").exists()


def signal_in_features(tmp_path):
    """linear_eval.py run by a wrapper that sends itself SIGUSR1 at batch i of the loader of n images
    (environment variable SIGNAL_AT=n:i)."""
    wrapper = tmp_path / "signal_in_features.py"
    wrapper.write_text(
        "import os, runpy, signal, sys, torch\n"
        "n, at = map(int, os.environ['SIGNAL_AT'].split(':'))\n"
        "iterate = torch.utils.data.DataLoader.__iter__\n"
        "def iterate_and_signal(self):\n"
        "    for i, batch in enumerate(iterate(self)):\n"
        "        if len(self.dataset) == n and i == at:\n"
        "            os.kill(os.getpid(), signal.SIGUSR1)\n"
        "        yield batch\n"
        "torch.utils.data.DataLoader.__iter__ = iterate_and_signal\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'linear_eval.py')!r}\n"
        f"runpy.run_path({str(REPO / 'linear_eval.py')!r}, run_name='__main__')\n")
    return wrapper


def fast_probe_args(pretrained, out):
    """A fast probe of 600 training images (18 steps in 2 epochs) and 100 test images."""
    return ["--ckpt", pretrained / "last.pt", "--mode", "fast", "--device", "cpu", "--workers", "0", "--batch-size",
            "64", "--epochs", "2", "--synthetic-size", "600", "100", "--output-dir", out]


def test_linear_eval_stopped_while_computing_features_saves_and_the_next_run_goes_on(tmp_path, pretrained):
    """The features of a large dataset take minutes, more than a time limit's warning: a stop asked
    for meanwhile ends the run at the next batch of 256. Before training (fast mode: the train
    features), it saves the untrained probe; before the evaluation, it has saved the trained one.
    Each time the same command goes on, and the last one writes results.json."""
    wrapper, out = signal_in_features(tmp_path), tmp_path / "le"
    args = fast_probe_args(pretrained, out)
    proc = run_script(wrapper, *args, env=clean_env(SIGNAL_AT="600:2"))  # the train features, before training
    assert "SIGUSR1: stopped at step 0, saved" in proc.stdout and load(out / "last.pt")["step"] == 0
    proc = run_script(wrapper, *args, env=clean_env(SIGNAL_AT="100:0"))  # the test features, after training
    assert "at step 0" in proc.stdout and "SIGUSR1: stopped at step 18 before the evaluation, saved" in proc.stdout
    assert load(out / "last.pt")["step"] == 18 and not (out / "results.json").exists()
    proc = run_script("linear_eval.py", *args)
    assert "at step 18" in proc.stdout and "linear top-1" in proc.stdout and (out / "results.json").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 0), (signal.SIGTERM, 143)])
def test_two_tasks_agree_to_stop_when_one_gets_the_signal(tmp_path, fake_scontrol, sig, code):
    """srun signals every task, but not at the same instant: a signal seen by one process must
    stop all of them at the same step, and the same way (here only rank 1 gets it)."""
    from test_slurm_env import free_job_id, slurm_vars
    bin_dir, log = fake_scontrol
    job_id = free_job_id()
    procs = [Started("simclr.py", *TINY, "--epochs", "50", "--knn-every", "0", "--output-dir", tmp_path / "run",
                     env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **slurm_vars(r, 2, job_id)))
             for r in (0, 1)]
    try:
        procs[0].wait_for("epoch 0 step")
        procs[1].send_signal(sig)
    finally:  # a hung process must not outlive the test (wait kills it)
        codes = [p.wait(timeout=180) for p in procs]
    assert codes == [code, code], procs[0].output + procs[1].output
    if sig == signal.SIGUSR1:
        assert log.read_text().split() == ["requeue", str(job_id)]  # rank 0 requeues, once
    else:
        assert not log.exists() and "SIGTERM: stopped at step" in procs[0].output
    assert load(tmp_path / "run" / "last.pt")["step"] < 200


def test_the_flags_tensor_outlives_every_all_reduce(monkeypatch):
    """Every process all-reduces the signal flags at each step. With torch < 2.8 a gloo worker thread
    that frees the last tensor of a collective needs the GIL, which the process group's destructor
    holds at exit: a job could hang at its end (seen with torch 2.4: a 2-task run stopped by a
    signal never exited). So the tensor handed to all_reduce must stay alive after the call."""
    import weakref
    import torch.distributed as dist
    from simclr import Preemption
    handed = []

    def all_reduce(t, op=None, group=None):
        handed.append(weakref.ref(t))
        t[1] = 1  # another process got SIGTERM

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's handlers alone
    p = Preemption(2, torch.device("cpu"))
    assert p.requested() and p.term and not p.usr1
    p.requested()
    assert len(handed) == 2 and all(r() is not None for r in handed) and handed[0]() is handed[1]()


def signal_the_job(args, sig, trigger, timeout=180, script="simclr.py", fresh=False):
    """Run simclr.py in a process group of its own and send `sig` to the whole group (as SLURM signals
    every process of a job step, loader processes included) once a line starts with `trigger`."""
    proc = Started(script, *args, new_session=True, fresh=fresh)
    try:
        proc.wait_for(trigger)
        proc.send_signal(sig, group=True)
        return proc.wait(timeout), proc.output
    finally:  # loader processes left behind by a failure
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# The PIL pipeline in 2 loader processes (--aug-device cpu), which get the signal too.
WORKERS = [*TINY[:TINY.index("--workers")], "--workers", "2", "--log-every", "1", "--aug-device", "cpu"]


@pytest.mark.parametrize("start", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 0)])
def test_a_signal_to_every_process_of_the_job_still_saves(tmp_path, sig, code, start):
    """torch's loader processes die of SIGTERM and SIGUSR1 (scancel, a time limit's warning); the main
    process then stopped with a traceback (or a false 'full disk' line) instead of saving. They now
    ignore both and the run saves (SIGUSR1 outside SLURM: saved, not requeued, exit 0).
    forkserver (Python 3.14's default start method on Linux): multiprocessing's resource tracker died
    of SIGUSR1 and its replacement printed a traceback for each shared-memory batch it did not know.
    A fresh interpreter: one forked from the tests' process would use that process's tracker."""
    wrapper = tmp_path / "start_method.py"
    wrapper.write_text(f"import multiprocessing, runpy, sys\nmultiprocessing.set_start_method({start!r}, force=True)\n"
                       f"sys.path.insert(0, {str(REPO)!r})\nsys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
                       f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    got, output = signal_the_job([*WORKERS, "--epochs", "50", "--knn-every", "0", "--output-dir", tmp_path / "run"],
                                 sig, "epoch 0 step 2/", script=wrapper, fresh=start != "fork")
    assert got == code and "Traceback" not in output, output
    assert f"{sig.name}: stopped at step" in output and load(tmp_path / "run" / "last.pt")["step"] >= 2


@pytest.mark.parametrize("at", ["start", 2])
def test_a_signal_during_the_knn_cuts_it_short_and_the_resumed_run_does_it(tmp_path, at):
    """A kNN on a large dataset outlasts a time limit's warning: a stop asked for while it runs (its
    loader processes alive, and signalled too) ends it at its next batch. The run saves at the
    epoch's last step, its kNN and epoch row postponed; the resumed run does them first.
    at=2: SIGTERM to the whole job once the loader of the test images (600: 3 batches) has given 2
    batches, one from each of its processes; at="start": as soon as its processes are started."""
    wrapper = tmp_path / "signal_in_knn.py"
    wrapper.write_text(
        "import os, runpy, signal, sys, torch\n"
        "iterate = torch.utils.data.DataLoader.__iter__\n"
        f"at = {at!r}\n"
        "def iterate_and_signal(self):\n"
        "    batches = iterate(self)  # the loader's processes start\n"
        "    if len(self.dataset) != 600:\n"
        "        return batches\n"
        "    if at == 'start':\n"
        "        signal_the_group()\n"
        "    return signal_at_batch(batches)\n"
        "def signal_at_batch(batches):\n"
        "    for i, batch in enumerate(batches):\n"
        "        if i == at:\n"
        "            signal_the_group()\n"
        "        yield batch\n"
        "def signal_the_group():  # from another process, as SLURM: a loader process ends on its parent's\n"
        "    group, child = os.getpgid(0), os.fork()\n"
        "    if child == 0:\n"
        "        os.killpg(group, signal.SIGTERM)\n"
        "        os._exit(0)\n"
        "    os.waitpid(child, 0)\n"
        "torch.utils.data.DataLoader.__iter__ = iterate_and_signal\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    out = tmp_path / "run"
    args = [*WORKERS, "--synthetic-size", "128", "600", "--epochs", "3", "--knn-every", "1", "--output-dir", out]
    proc = Started(wrapper, *args, new_session=True)
    code, output = proc.wait(timeout=180), proc.output
    assert code == 143 and "Traceback" not in output, output
    assert "SIGTERM: stopped at step 4," in output and "epoch 0 done" not in output, output
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 4 and ckpt["epoch_loss"][1] == 4  # the epoch's losses kept for its row
    proc = run_script("simclr.py", *args, "--max-steps", "4")
    assert f"resumed from {out / 'last.pt'} at step 4" in proc.stdout and "epoch 0 done step 4/12" in proc.stdout
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4")] and rows[0]["knn_top1"]


def test_ctrl_c_saves_then_stops_and_the_run_resumes(tmp_path):
    """Ctrl-C reaches the loader processes too (one process group). The first one stops the run as
    SIGTERM does, after saving, with exit code 130; the same command then resumes."""
    out = tmp_path / "run"
    code, output = signal_the_job([*WORKERS, "--epochs", "50", "--knn-every", "0", "--output-dir", out],
                                  signal.SIGINT, "epoch 0 step 2/")
    assert code == 130 and "Traceback" not in output, output
    step = load(out / "last.pt")["step"]
    assert f"Ctrl-C: stopped at step {step}, saved" in output and step >= 2
    assert f"at step {step}" in run_script("simclr.py", *WORKERS, "--epochs", "50", "--knn-every", "0",
                                           "--output-dir", out, "--max-steps", step + 1).stdout


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    out = tmp_path / "run"
    run_script("simclr.py", *TINY, "--epochs", "50", "--knn-every", "0", "--output-dir", out, "--max-steps", "2")
    before = (out / "last.pt").read_bytes()
    proc = Started("simclr.py", *TINY, "--epochs", "50", "--knn-every", "0", "--output-dir", out)
    proc.wait_for("epoch 0 step 4/")
    proc.send_signal(signal.SIGINT)
    proc.wait_for("Ctrl-C: saving")  # the first one was seen: the second stops at once
    proc.send_signal(signal.SIGINT)
    code, output = proc.wait(timeout=120), proc.output
    assert code == 130 and "Traceback" not in output, output  # a shell's code for Ctrl-C, as the first one's
    assert output.strip().splitlines()[-1].startswith("error: interrupted: what was trained since the last checkpoint")
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("saved", [True, False])
def test_ctrl_c_before_training_says_whether_anything_was_saved(tmp_path, saved):
    """Ctrl-C before the signal handlers are in place (here while the data loads) is a plain
    KeyboardInterrupt: one line, saying what a rerun does: resume from last.pt, or start again."""
    out = tmp_path / "run"
    if saved:
        run_script("simclr.py", *TINY, "--epochs", "2", "--knn-every", "0", "--output-dir", out, "--max-steps", "2")
    wrapper = tmp_path / "interrupted.py"
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import common\n"
        "def load_data(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "common.load_data = load_data\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    proc = run_script(wrapper, *TINY, "--epochs", "2", "--knn-every", "0", "--output-dir", out, check=False)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: interrupted: what was trained since the last checkpoint in {out} is lost; run the same command to "
        "resume from it" if saved else
        "error: interrupted before the first checkpoint: nothing was saved; the same command starts again")


def test_a_signal_at_an_epochs_last_step_postpones_its_knn_to_the_resumed_run(tmp_path, script="simclr.py"):
    """No kNN once a stop is asked for (the time limit is near). The resumed run does that epoch's
    end first, so its row (loss, learning rate, kNN; no img/s) is that of a run that never stopped:
    here after epoch 0's last step (step 4) and after the run's very last (step 8, the final kNN); at
    step 4 also when the first resumed run writes that row, then dies before its next save. The four
    method scripts share these lines of their loop; DINO passed this test too (50 s, so it is not run each time)."""
    import csv
    args = [*TINY, *METHODS[script], "--epochs", "2", "--knn-every", "1", "--deterministic"]
    run_script(script, *args, "--output-dir", tmp_path / "straight")
    wrapper = tmp_path / "signal_at.py"  # the run sends itself SIGUSR1 in its n-th step (one zero_grad a step)
    wrapper.write_text(
        "import os, runpy, signal, sys, torch\n"
        "at, steps, zero_grad = int(os.environ['SIGNAL_AT']), [0], torch.optim.Optimizer.zero_grad\n"
        "def counted(*a, **k):\n"
        "    steps[0] += 1\n"
        "    if steps[0] == at:\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    return zero_grad(*a, **k)\n"
        "torch.optim.Optimizer.zero_grad = counted\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n")

    def epoch_rows(out, column=None):
        with open(out / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["kind"] == "epoch"]
        return [r[column] for r in rows] if column else [(r["epoch"], r["step"], r["loss"], r["lr"], r["knn_top1"])
                                                         for r in rows]

    crash = tmp_path / "killed_in_save.py"  # the run is killed (SIGKILL) in its first write of last.pt
    crash.write_text(
        "import os, runpy, signal, sys, torch\n"
        "save = torch.save\n"
        "def save_or_die(obj, f, *a, **k):\n"
        "    if '/last.pt.' in str(getattr(f, 'name', f)):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(obj, f, *a, **k)\n"
        "torch.save = save_or_die\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n")

    expected = epoch_rows(tmp_path / "straight")
    assert len(expected) == 2 and all(knn for *_, knn in expected)
    for stop_at in (4, 8):
        out = tmp_path / f"stopped_at_{stop_at}"
        proc = run_script(wrapper, *args, "--output-dir", out, env=clean_env(SIGNAL_AT=str(stop_at)))
        assert f"SIGUSR1: stopped at step {stop_at}, saved" in proc.stdout
        assert len(epoch_rows(out)) == stop_at // 4 - 1  # the stopped epoch's row is not written yet
        if stop_at == 4:  # a resumed run writes the postponed row, then dies before saving again: written once
            assert run_script(crash, *args, "--output-dir", out, check=False).returncode != 0
            assert epoch_rows(out) == expected[:1] and load(out / "last.pt")["step"] == 4
        proc = run_script(script, *args, "--output-dir", out)
        assert f"resumed from {out / 'last.pt'} at step {stop_at}" in proc.stdout
        assert epoch_rows(out) == expected  # the learning rate too: that of the epoch's last step, not 0
        # No img/s in the row of a resumed run's postponed epoch end: none of that epoch's steps ran in it
        assert [bool(v) for v in epoch_rows(out, "img_per_s")] == [stop_at == 8, stop_at == 4]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("epoch 1 done"))  # the console's too
        assert re.search(r" lr \S+( \S+ img/s)? mem \d+ MiB knn ", line) and ("img/s" in line) == (stop_at == 4), line


@pytest.mark.parametrize("sig,end,code", [("SIGTERM", "done", 0), ("SIGUSR1", "done", 0), ("SIGUSR1", "stopped", 143)])
def test_a_signal_while_python_shuts_down_leaves_the_exit_code(tmp_path, sig, end, code):
    """Python gives the signals it handled their default action back while it shuts down (a second
    or two after the last line, with torch): SLURM's or torchrun's signal then killed a run that had
    ended (exit -15: a failed step, a torchrun ChildFailedError). An object deleted at shutdown sends
    it here, after that point; a real interpreter, as the forked test runs skip Python's shutdown."""
    wrapper = tmp_path / "signal_at_shutdown.py"
    wrapper.write_text(
        "import os, runpy, signal, sys\n"
        "class SignalAtShutdown:\n"
        "    def __del__(self):\n"
        f"        os.kill(os.getpid(), signal.{sig})\n"
        "keep = SignalAtShutdown()\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    stop = ["--max-steps", "2"] if end == "done" else ["--epochs", "50"]
    cmd = [sys.executable, wrapper, *TINY, "--epochs", "1", "--knn-every", "0", *stop, "--output-dir", tmp_path / "run"]
    if end == "done":
        proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
    else:  # SIGTERM during training: saved, exit 143, and the shutdown's signal after that
        with open(tmp_path / "output", "w") as f:
            proc = subprocess.Popen(cmd, env=clean_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
            while "epoch 0 step" not in (tmp_path / "output").read_text() and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        output = (tmp_path / "output").read_text()
    assert proc.returncode == code, output
    assert ("done at step 2" if end == "done" else "SIGTERM: stopped at step") in output


@pytest.mark.parametrize("script,sig", [("simclr.py", "SIGUSR1"), ("simclr.py", "SIGTERM"), ("simclr.py", "SIGINT"),
                                        ("byol.py", "SIGUSR1"), ("barlow.py", "SIGUSR1"), ("dino.py", "SIGUSR1")])
def test_a_signal_after_the_last_step_ends_the_run_as_planned(tmp_path, fake_scontrol, script, sig):
    """A signal that arrives once the last step is done (here while the last epoch's last.pt is
    written) finds nothing left to train: the run writes backbone.pt and ends with 0, instead of
    requeueing a job (which may wait hours in the queue) only to write it."""
    bin_dir, log = fake_scontrol
    wrapper = tmp_path / "signal_in_save.py"  # the run sends itself the signal in its first write of last.pt
    wrapper.write_text(
        "import os, runpy, signal, sys, torch\n"
        "save, sent = torch.save, []\n"
        "def save_and_signal(obj, f, *a, **k):\n"
        "    if not sent and '/last.pt.' in str(getattr(f, 'name', f)):\n"
        f"        sent.append(os.kill(os.getpid(), signal.{sig}))\n"
        "    return save(obj, f, *a, **k)\n"
        "torch.save = save_and_signal\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n")
    out = tmp_path / "run"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    proc = run_script(wrapper, *TINY, *METHODS[script], "--epochs", "1", "--knn-every", "0", "--output-dir", out,
                      env=env)  # exits 0 (checked)
    assert "done at step 4" in proc.stdout and "the stop signal came after the last step: not requeued" in proc.stdout
    assert not log.exists() and load(out / "last.pt")["step"] == 4 and (out / "backbone.pt").exists()


def signal_in_load(tmp_path, script, sig="SIGUSR1"):
    """`script` run by a wrapper that sends itself `sig` as the data load starts."""
    wrapper = tmp_path / "signal_in_load.py"
    wrapper.write_text(
        "import os, runpy, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import common\n"
        "load = common.load_data\n"
        "def signal_then_load(args):\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "    return load(args)\n"
        "common.load_data = signal_then_load\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n")
    return wrapper


def start_up_args(script, pretrained):
    if script == "linear_eval.py":
        return ["--ckpt", pretrained / "last.pt", "--device", "cpu", "--workers", "0", "--batch-size", "32",
                "--mode", "linear"]
    return [*TINY, "--epochs", "2", "--knn-every", "0"]


@pytest.mark.parametrize("script,step", [("simclr.py", 1), ("linear_eval.py", 0)])
def test_time_limit_warning_during_the_start_up_saves_and_requeues(tmp_path, fake_scontrol, pretrained, script, step):
    """SIGUSR1 while the data load (a time limit short for the start-up, or a scancel --signal): the
    run saves and requeues, instead of dying of the signal's default action with nothing saved and
    the job not requeued. Pretraining does one step first; linear_eval stops before its first (as
    after a stop during the features), with an untrained probe."""
    bin_dir, log = fake_scontrol
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    proc = run_script(signal_in_load(tmp_path, script), *start_up_args(script, pretrained), "--output-dir",
                      tmp_path / "run", env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SIGUSR1: stopped at step {step}, saved {tmp_path / 'run' / 'last.pt'}" in proc.stdout
    assert log.read_text().split() == ["requeue", "4242"] and load(tmp_path / "run" / "last.pt")["step"] == step


@pytest.mark.parametrize("script", ["simclr.py", "linear_eval.py"])
def test_a_requeued_job_stopped_before_its_first_step_is_not_requeued_again(tmp_path, fake_scontrol, pretrained,
                                                                             script):
    """linear_eval stops before its first step. In a requeued job (SLURM_RESTART_COUNT set) that means
    the job's --time does not cover its start-up: each next job, given the same time, would stop there
    too, requeued without end. It saves, ends FAILED (exit 1) and says what to change. Pretraining
    keeps a stop at the start-up for the end of its first step: that job made progress and is requeued."""
    bin_dir, log = fake_scontrol
    out = tmp_path / "run"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="3")
    proc = run_script(signal_in_load(tmp_path, script), *start_up_args(script, pretrained), "--output-dir", out,
                      env=env, check=False)
    if script == "simclr.py":
        assert proc.returncode == 0 and "requeued SLURM job 4242" in proc.stdout, proc.stdout + proc.stderr
        assert log.read_text().split() == ["requeue", "4242"] and load(out / "last.pt")["step"] == 1
        return
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: requeued job 4242 (restart 3) got SIGUSR1 before its first step, and the next one would too with "
        f"the same --time: not requeued; {out / 'last.pt'} is kept (step 0): give the job a longer --time, then "
        f"submit it again with --output-dir {out}"]
    assert not log.exists() and load(out / "last.pt")["step"] == 0
    # scancel in such a job: the usual SIGTERM exit, not this error
    proc = run_script(signal_in_load(tmp_path, script, "SIGTERM"), *start_up_args(script, pretrained), "--output-dir",
                      out, env=env, check=False)
    assert proc.returncode == 143 and "SIGTERM: stopped at step 0" in proc.stdout, proc.stdout + proc.stderr
    assert not log.exists() and "error" not in proc.stderr


def test_a_requeued_linear_eval_that_trains_is_requeued_and_one_stopped_in_its_evaluation_alone_is_not(
        tmp_path, fake_scontrol, pretrained):
    """The evaluation's features come after the last step: a requeued job that trained, then got
    the signal during them, made progress and is requeued; the next, stopped there again before any
    step (all done), would be requeued without end."""
    bin_dir, log = fake_scontrol
    wrapper, out = signal_in_features(tmp_path), tmp_path / "le"
    args = fast_probe_args(pretrained, out)
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    proc = run_script(wrapper, *args, env=clean_env(SIGNAL_AT="100:0", **env))  # the test features, after training
    assert "SIGUSR1: stopped at step 18 before the evaluation" in proc.stdout
    assert "requeued SLURM job 4242" in proc.stdout
    assert log.read_text().split() == ["requeue", "4242"]
    env["SLURM_RESTART_COUNT"] = "2"
    proc = run_script(wrapper, *args, env=clean_env(SIGNAL_AT="100:0", **env), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: requeued job 4242 (restart 2) got SIGUSR1 before its first step" in proc.stderr
    assert log.read_text().split() == ["requeue", "4242"] and load(out / "last.pt")["step"] == 18
    assert not (out / "results.json").exists()
