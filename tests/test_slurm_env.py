"""The distributed setup read from torchrun's or SLURM's variables, with fake SLURM environments."""
import argparse
import random
import socket

import pytest

import simclr
from conftest import TINY, Started, clean_env, load, max_diff, run_script


@pytest.mark.parametrize("nodelist,host", [
    ("vm", "vm"), ("node1,node2", "node1"), ("gpu[003-005,010],cpu1", "gpu003"), ("n[5]", "n5"),
    ("my-node[07,09-11]", "my-node07"), ("jean-zay-iam[01-04]", "jean-zay-iam01")])
def test_first_host(nodelist, host):
    assert simclr.first_host(nodelist) == host


def slurm_vars(procid, ntasks, job_id, step=True):
    env = {"SLURM_JOB_ID": str(job_id), "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_LOCALID": str(procid), "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1"}
    if step:
        env["SLURM_STEP_ID"] = "0"  # srun sets it; the batch shell does not
    return env


def free_job_id():
    """A random SLURM job id whose MASTER_PORT (15000 + id % 20000 in an srun step) is free now: a
    port already in use on this machine failed a test with EADDRINUSE."""
    while True:
        job_id = random.randint(1, 19999)
        with socket.socket() as s:
            try:
                s.bind(("", 15000 + job_id))
                return job_id
            except OSError:
                continue


def test_single_task_srun_step(monkeypatch):
    for key, value in slurm_vars(0, 1, 1234).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    expected = (0, 0, 1, simclr.torch.device("cpu"))
    assert simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8)) == expected
    import os
    assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["MASTER_PORT"] == str(15000 + 1234)


def test_second_step_of_a_job_on_its_second_node(monkeypatch):
    """Two multi-task steps of one 2-node job side by side (`srun -N1 -n4 ... &` twice): the second
    one's rank 0 is on the step's first node, not the job's, and its port is not the first one's."""
    env = {**slurm_vars(0, 1, 1234), "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_STEP_NODELIST": "gpu2",
           "SLURM_STEP_ID": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))
    import os
    assert os.environ["MASTER_ADDR"] == "gpu2" and os.environ["MASTER_PORT"] == str(15000 + 2234)


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_a_process_on_the_second_node_has_its_global_and_local_ranks(monkeypatch, launcher):
    """Rank 5 of 8, the second of its node (4 GPUs each): global rank for the process group, local
    rank for the GPU. Every other test has rank == local rank, where swapping them goes unseen."""
    if launcher == "srun":
        env = {**slurm_vars(5, 8, 7), "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    else:
        env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu1", "MASTER_PORT": "29500",
               "TORCHELASTIC_RUN_ID": "none"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    groups = []
    monkeypatch.setattr(simclr.dist, "init_process_group", lambda backend, **kw: groups.append(kw))
    monkeypatch.setattr(simclr.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(simclr.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(simclr.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(simclr.torch.cuda, "set_device", lambda d: None)
    rank, local_rank, world_size, device = simclr.setup_distributed(argparse.Namespace(device="cuda", batch_size=8))
    assert (rank, local_rank, world_size, device) == (5, 1, 8, simclr.torch.device("cuda", 1))
    assert groups[0]["rank"] == 5 and groups[0]["world_size"] == 8


def test_a_master_address_and_port_set_by_the_user_are_kept_under_srun(monkeypatch):
    """Set in the sbatch script (a port known to be free, the node's fast interface): not replaced."""
    for key, value in {**slurm_vars(0, 1, 1234), "MASTER_ADDR": "ib0-host", "MASTER_PORT": "23456"}.items():
        monkeypatch.setenv(key, value)
    simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))
    import os
    assert os.environ["MASTER_ADDR"] == "ib0-host" and os.environ["MASTER_PORT"] == "23456"


def test_batch_shell_of_a_multi_task_job_runs_one_process_with_a_warning(monkeypatch, capsys):
    for key, value in slurm_vars(0, 4, 99, step=False).items():
        monkeypatch.setenv(key, value)
    assert simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))[2] == 1
    assert "not started by srun" in capsys.readouterr().err


def test_torchrun_variables_win_over_slurm(monkeypatch):
    for key, value in {**slurm_vars(1, 2, 5), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))[:3] == (0, 0, 1)


def test_world_size_1_alone_is_one_process(monkeypatch):
    """Some platforms export WORLD_SIZE=1 everywhere: one process, as without it (RANK alone, or a
    WORLD_SIZE above 1 alone, is half of torchrun's pair: an error, test_bad_inputs)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    for key in ("RANK", "SLURM_STEP_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert simclr.setup_distributed(argparse.Namespace(device="cpu", batch_size=8))[:3] == (0, 0, 1)


@pytest.mark.parametrize("launcher,gpus,local_rank,device", [("torchrun", 2, 3, None), ("torchrun", 2, 1, 1),
                                                             ("torchrun", 1, 1, None), ("rank vars", 1, 3, 0),
                                                             ("srun", 1, 3, 0), ("srun", 4, 5, 1)])
def test_a_process_without_a_gpu_of_its_own_is_one_line(monkeypatch, launcher, gpus, local_rank, device):
    """torchrun with 4 processes on a node that shows 2 GPUs (or 2 on a node with one): local rank 3
    would share GPU 1 and NCCL stop at the first collective with "Duplicate GPU detected"; it stops at
    once, saying what to change. SLURM (or a launcher that sets RANK and CUDA_VISIBLE_DEVICES, not
    torchrun) may show each process its own GPUs (one, or the 4 of its socket): there the local rank
    wraps around them. torch.cuda is a stand-in here. The process group waits 30 minutes, not NCCL's
    10, for a process that is late (rank 0 downloading the dataset)."""
    env = ({"RANK": str(local_rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(local_rank)} if launcher != "srun"
           else slurm_vars(local_rank, 8, 7))
    if launcher == "torchrun":
        env["TORCHELASTIC_RUN_ID"] = "none"  # torchrun's default run id
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key, value in {**env, "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(simclr.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(simclr.torch.cuda, "device_count", lambda: gpus)
    chosen = []
    monkeypatch.setattr(simclr.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(simclr.torch, "set_num_threads", lambda n: None)  # srun: this process keeps its threads
    monkeypatch.setattr(simclr.dist, "init_process_group",
                        lambda backend, **kw: chosen.append((backend, kw["timeout"].total_seconds())))
    args = argparse.Namespace(device="cuda", batch_size=8)
    if device is None:
        with pytest.raises(SystemExit) as e:
            simclr.setup_distributed(args)
        assert str(e.value) == (f"error: process {local_rank} of this node has no GPU of its own ({gpus} GPU(s) "
                                "visible): start one process per GPU (--nproc_per_node, or --ntasks-per-node equal to "
                                "--gpus-per-node)")
        assert chosen == []
    else:
        assert simclr.setup_distributed(args)[3] == simclr.torch.device("cuda", device)
        assert chosen == [simclr.torch.device("cuda", device), ("nccl", 1800.0)]


def test_two_tasks_from_slurm_variables_train_together(tmp_path):
    """Two processes started as srun would start them (only SLURM variables, no torchrun) form a
    gloo group and train like one process with the same global batch."""
    job_id = free_job_id()
    args = [*TINY, "--epochs", "1", "--max-steps", "2", "--deterministic", "--knn-every", "0"]
    procs = [Started("simclr.py", *args, "--output-dir", tmp_path / "two", env=clean_env(**slurm_vars(r, 2, job_id)))
             for r in (0, 1)]
    codes = [p.wait(timeout=240) for p in procs]
    outs = [p.output for p in procs]
    assert codes == [0, 0], outs
    assert "2 process(es)" in outs[0] and outs[1] == ""  # only rank 0 prints
    run_script("simclr.py", *args, "--output-dir", tmp_path / "one")
    assert max_diff(load(tmp_path / "one" / "last.pt")["model"], load(tmp_path / "two" / "last.pt")["model"]) < 1e-4
