"""Helpers for the test-suite: every test runs on the CPU with the synthetic dataset and tiny
settings; the scripts are run as users run them, in subprocesses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A few seconds per run: 128 synthetic 16 px images, batch 32, no loader processes.
TINY = ["--dataset", "synthetic", "--synthetic-size", "128", "64", "--image-size", "16", "--batch-size", "32",
        "--device", "cpu", "--workers", "0", "--log-every", "2"]

# Narrower heads than the defaults (4096, 2048) keep the BYOL, Barlow Twins and DINO test runs
# quick; DINO runs with 2 local crops (8 px), so that multi-crop is part of every test.
METHODS = {"simclr.py": [], "byol.py": ["--proj-hidden-dim", "256", "--pred-hidden-dim", "256"],
           "barlow.py": ["--proj-hidden-dim", "256", "--proj-dim", "256"],
           "dino.py": ["--head-hidden-dim", "256", "--out-dim", "256", "--local-crops", "2"]}
# DINO with a ViT (AdamW recipe, drop path, gradient checkpointing): 16 px images, 4 px patches.
DINO_VIT = [*METHODS["dino.py"], "--arch", "vit_tiny", "--grad-checkpointing"]


def clean_env(**extra):
    """The environment of a user's shell: no torchrun or SLURM variables leaking in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_script(script, *args, cwd=REPO, env=None, timeout=300, check=True):
    """Run `python <script> args...` and return the CompletedProcess (stdout, stderr as text)."""
    cmd = [sys.executable, str(Path(cwd) / script) if not os.path.isabs(script) else script, *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(script, *args, nproc=2, cwd=REPO, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(cwd) / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a, b):
    """Largest absolute difference between two state dicts (floating-point entries)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """One tiny SimCLR run shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("simclr")
    run_script("simclr.py", *TINY, "--epochs", "2", "--output-dir", out, "--knn-every", "1")
    return out
