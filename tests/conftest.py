"""Helpers for the test-suite: every test runs on the CPU with the synthetic dataset and tiny
settings; the scripts are run as users run them, in subprocesses."""
import atexit
import json
import multiprocessing
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A few seconds per run: 128 synthetic 8 px images, batch 32, no loader processes (16 px doubled
# the time of a run: the ResNet's convolutions set it, even this small).
TINY = ["--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "8", "--batch-size", "32",
        "--device", "cpu", "--workers", "0", "--log-every", "2"]

# Narrower heads than the defaults (4096, 2048) keep the BYOL, Barlow Twins and DINO test runs
# quick; DINO runs with 2 local crops (4 px), so that multi-crop is part of every test.
METHODS = {"simclr.py": [], "byol.py": ["--proj-hidden-dim", "256", "--pred-hidden-dim", "256"],
           "barlow.py": ["--proj-hidden-dim", "256", "--proj-dim", "256"],
           "dino.py": ["--head-hidden-dim", "256", "--out-dim", "256", "--local-crops", "2", "--local-crop-size", "4"]}
# DINO with a ViT (AdamW recipe, drop path, gradient checkpointing): 16 px images, 4 px patches,
# 8 px local crops (after TINY: the later --image-size wins).
DINO_VIT = [*METHODS["dino.py"], "--arch", "vit_tiny", "--grad-checkpointing", "--image-size", "16",
            "--local-crop-size", "8"]


torch.set_num_threads(1)  # the tests run in this process too: one thread, as the runs (clean_env)


def clean_env(**extra):
    """The environment of a user's shell: no torchrun or SLURM variables leaking in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env["PYTHONUNBUFFERED"] = "1"
    # One thread per process: runs this tiny are faster on one (a 2-epoch SimCLR run took 12.4 s,
    # against 15.7 s on two), and two test workers (pytest-xdist) then share two cores.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# Most runs are forked from a server process that has already imported torch and torchvision:
# each saves the 5-6 s of CPU those imports take here. The child is a process of its own (own
# pid, signals, process group if asked, environment, working directory, stdout/stderr) that runs
# the script as `python script.py args` would, as __main__: run_script waits for it, Started runs
# it in the background (to be signalled), torchrun starts its processes so. SSL_TESTS_NO_FORK=1
# starts a fresh interpreter for every run instead. torchrun itself (one test), the sbatch scripts
# and the SLURM cluster's jobs always start real interpreters.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["torch", "torchvision", "numpy", "PIL.Image"])
# What a fresh interpreter puts on sys.path after the script's folder and PYTHONPATH (not the
# repository or tests/, which pytest and this file add): a copied script must not find them.
_PLAIN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
SYS_PATH = json.loads(subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                                     env=_PLAIN, capture_output=True, text=True, check=True).stdout)


def _run_main(script, args, cwd, env, out, err, new_session=False):
    """In the forked child: the environment and streams of `python script args`, then the script.
    err == out: one file for both streams (as stderr=STDOUT); new_session: a process group of its own."""
    if new_session:
        os.setsid()
    # Loader processes started as python would start them (fork on Linux before Python 3.14), not
    # through this forkserver (the start method a forked child inherits): in its process group too.
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[:] = [str(Path(script).parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep)), *SYS_PATH]
    fds = {path: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND) for path in (out, err)}
    for fd, path in ((1, out), (2, err)):
        os.dup2(fds[path], fd)
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    sys.argv = [script, *args]
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))  # torch read it in the server
    try:
        runpy.run_path(script, run_name="__main__")  # SystemExit is the exit status, as in python
    finally:
        atexit._run_exitfuncs()


def run_script(script, *args, cwd=REPO, env=None, timeout=300, check=True):
    """Run `python <script> args...` and return the CompletedProcess (stdout, stderr as text)."""
    path = str(script) if os.path.isabs(script) else str(Path(cwd) / script)
    cmd, env = [sys.executable, path, *map(str, args)], env or clean_env()
    if os.environ.get("SSL_TESTS_NO_FORK"):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            child = FORKSERVER.Process(target=_run_main, args=(path, cmd[2:], str(cwd), env, out, err))
            child.start()
            child.join(timeout)
            if child.exitcode is None:
                child.kill()
                child.join()
                raise subprocess.TimeoutExpired(cmd, timeout)
            proc = subprocess.CompletedProcess(cmd, child.exitcode, Path(out).read_text(), Path(err).read_text())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Started:
    """`python <script> args...` started in the background, as subprocess.Popen(..., stdout=PIPE,
    stderr=STDOUT) would, but forked like run_script's runs (SSL_TESTS_NO_FORK=1: a real Popen).
    Both streams go to one file: `output` is all of it so far, wait_for() waits for a line."""

    def __init__(self, script, *args, cwd=REPO, env=None, new_session=False, fresh=False):
        path = str(script) if os.path.isabs(script) else str(Path(cwd) / script)
        self.cmd, env = [sys.executable, path, *map(str, args)], env or clean_env()
        folder = tempfile.mkdtemp(prefix="started-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.file = Path(folder) / "output"
        self.file.touch()
        if fresh or os.environ.get("SSL_TESTS_NO_FORK"):  # fresh: none of this process's state, nor helpers
            with open(self.file, "w") as f:
                self._proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=new_session)
        else:
            self._proc = FORKSERVER.Process(target=_run_main, args=(path, self.cmd[2:], str(cwd), env, str(self.file),
                                                                    str(self.file), new_session))
            self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self):
        return self._proc.poll() if isinstance(self._proc, subprocess.Popen) else self._proc.exitcode

    @property
    def output(self):
        return self.file.read_text()

    def send_signal(self, sig, group=False):
        """Signal the process, or its whole process group (started with new_session=True)."""
        (os.killpg if group else os.kill)(self.pid, sig)

    def kill(self):
        if self.returncode is None:
            self.send_signal(signal.SIGKILL)

    def wait(self, timeout=180):
        """The exit code (negative: killed by that signal); killed after `timeout` seconds."""
        deadline = time.time() + timeout
        while self.returncode is None and time.time() < deadline:
            time.sleep(0.02)
        if self.returncode is None:
            self.kill()
            while self.returncode is None:
                time.sleep(0.02)
            with open(self.file, "a") as f:
                f.write(f"\n(killed: still running after {timeout} s)\n")
        return self.returncode

    def wait_for(self, prefix, timeout=120):
        """Return once a line of output starts with `prefix`; fail if the process ends first."""
        deadline, seen = time.time() + timeout, 0
        while time.time() < deadline:
            done = self.returncode is not None  # before reading: its last lines are in the file then
            lines = self.output.split("\n")
            if any(line.startswith(prefix) for line in lines[seen:-1]):
                return
            seen = max(seen, len(lines) - 1)
            if done:
                raise AssertionError(f"exited ({self.returncode}) before a line {prefix!r}:\n{self.output}")
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"no line {prefix!r} within {timeout} s:\n{self.output}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, cwd=REPO, timeout=300, real=False):
    """`torchrun --standalone --nproc_per_node=nproc script args`. Unless `real`, its processes are
    started as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set)
    but forked like run_script's runs: torchrun's three fresh interpreters cost some 13 s of CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(cwd) / script), *map(str, args)]
    if real or os.environ.get("SSL_TESTS_NO_FORK"):
        proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    else:
        port = free_port()
        procs = [Started(script, *args, cwd=cwd, env=clean_env(
            RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in range(nproc)]
        codes = [p.wait(timeout) for p in procs]
        output = "".join(p.output for p in procs)  # rank 0's first
        proc = subprocess.CompletedProcess(cmd, max(codes, key=abs), output, output)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def main_in_this_process(module, argv, monkeypatch):
    """module.main() with argv parsed, in the test's own process, so that the test can watch the
    functions it calls (monkeypatched beforehand): no torchrun or SLURM variables, and the signal
    handlers the run installs are put back after it."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")):
            monkeypatch.delenv(key)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        module.main(module.get_args_parser().parse_args(list(map(str, argv))))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a, b):
    """Largest absolute difference between two state dicts (floating-point entries)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def pytest_collection_modifyitems(items):
    """The real SLURM cluster's tests first: they take minutes, much of it waiting for SLURM, while
    the other pytest-xdist worker runs the rest."""
    items.sort(key=lambda item: item.path.name != "test_slurm_cluster.py")  # a stable sort


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """One tiny SimCLR run shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("simclr")
    run_script("simclr.py", *TINY, "--epochs", "2", "--output-dir", out, "--knn-every", "1")
    return out
