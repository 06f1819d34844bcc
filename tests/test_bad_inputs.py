"""Bad input gets one clear line naming the problem and the fix, never a traceback, and never
harms an existing run."""
import argparse
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, Started, clean_env, free_port, load, main_in_this_process, run_script


def fails(script, *args, cwd=None):
    proc = run_script(script, *args, check=False, **({"cwd": cwd} if cwd else {}))
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") or "error:" in last, proc.stderr
    return last


def test_missing_and_empty_image_folders(tmp_path):
    missing = tmp_path / "does-not-exist"
    assert "does-not-exist" in fails("simclr.py", *TINY, "--dataset", "imagefolder", "--data-dir", missing)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert "no images" in fails("simclr.py", *TINY, "--dataset", "imagefolder", "--data-dir", tmp_path / "empty")


def test_missing_npz(tmp_path):
    assert "x.npz" in fails("simclr.py", *TINY, "--dataset", "npz", "--data-dir", tmp_path / "x.npz")


def test_offline_cifar_download_explains_what_to_do(tmp_path):
    msg = fails("simclr.py", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--device", "cpu",
                "--output-dir", tmp_path / "out")
    assert "could not download cifar10" in msg and "download=True" in msg
    (tmp_path / "notes.txt").write_text("x")  # a file given as the folder: not a download problem
    assert fails("simclr.py", "--dataset", "cifar10", "--data-dir", tmp_path / "notes.txt", "--device", "cpu",
                 "--output-dir", tmp_path / "out") == (f"error: --data-dir {tmp_path / 'notes.txt'} is a file, not a "
                                                      "folder; give the folder that holds (or will hold) cifar10")


def test_batch_sizes(tmp_path):
    assert "larger than the 16 training images" in fails(
        "simclr.py", *TINY, "--synthetic-size", "16", "8", "--output-dir", tmp_path)
    # Not divisible by the number of processes: caught before any process waits for the others.
    env_msg = run_script("simclr.py", *TINY, "--batch-size", "33", "--output-dir", tmp_path, check=False,
                         env=__import__("conftest").clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"))
    assert env_msg.returncode != 0 and "not divisible by the 2 processes" in env_msg.stderr


def test_linear_eval_batch_size_of_every_training_image(tmp_path):
    """--batch-size equal to the number of training images is one step per epoch, not too large."""
    run_script("linear_eval.py", *TINY, "--synthetic-size", "32", "16", "--ckpt", "random", "--mode", "fast",
               "--epochs", "1", "--knn-every", "0", "--output-dir", tmp_path)
    assert load(tmp_path / "last.pt")["step"] == 1
    assert "larger than the 31 training images" in fails("linear_eval.py", *TINY, "--synthetic-size", "31", "16",
                                                         "--ckpt", "random", "--output-dir", tmp_path / "b")


def test_unknown_arch_and_dataset():
    for flag, value in (("--arch", "resnet7"), ("--dataset", "mnist")):
        proc = run_script("simclr.py", flag, value, check=False)
        assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_cuda_requested_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no GPU" in fails("simclr.py", *TINY, "--device", "cuda", "--output-dir", tmp_path)


def test_output_dir_that_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("x")
    assert "cannot write to --output-dir" in fails("simclr.py", *TINY, "--output-dir", tmp_path / "a-file" / "run")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a readable checkpoint" in fails("linear_eval.py", "--ckpt", tmp_path / "notes.txt", "--device", "cpu")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    error = fails("linear_eval.py", "--ckpt", tmp_path / "other.pt", "--device", "cpu")
    assert "not a checkpoint of these scripts" in error
    assert "does not exist" in fails("linear_eval.py", "--ckpt", tmp_path / "missing.pt", "--device", "cpu")


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "code-ran")
    torch.save({"backbone": {}, "backbone_meta": Payload(marker)}, tmp_path / "evil.pt")
    assert "refused" in fails("linear_eval.py", "--ckpt", tmp_path / "evil.pt", "--device", "cpu")
    assert "refused" in fails("simclr.py", *TINY, "--resume", tmp_path / "evil.pt", "--output-dir", tmp_path / "run")
    assert not os.path.exists(marker)


def test_truncated_last_pt_is_one_clear_line(tmp_path):
    run_script("simclr.py", *TINY, "--max-steps", "1", "--epochs", "1", "--knn-every", "0", "--output-dir", tmp_path)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    msg = fails("simclr.py", *TINY, "--epochs", "1", "--knn-every", "0", "--output-dir", tmp_path)
    assert "last.pt" in msg and "truncated" in msg


def test_resume_from_another_arch_method_or_a_backbone(tmp_path, pretrained):
    run_dir = tmp_path / "run"
    assert "--arch resnet18" in fails("simclr.py", *TINY, "--arch", "resnet34", "--resume", pretrained / "last.pt",
                                      "--output-dir", run_dir)
    assert "holds only a backbone" in fails("simclr.py", *TINY, "--resume", pretrained / "backbone.pt",
                                            "--output-dir", run_dir)
    other = load(pretrained / "last.pt")
    other["method"] = "byol"
    torch.save(other, tmp_path / "byol.pt")
    assert "written by byol.py" in fails("simclr.py", *TINY, "--resume", tmp_path / "byol.pt", "--output-dir", run_dir)
    assert not (run_dir / "last.pt").exists()


def test_linear_eval_needs_labels(tmp_path, pretrained):
    from PIL import Image
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    assert "needs labels" in fails("linear_eval.py", "--ckpt", pretrained / "backbone.pt", "--dataset", "imagefolder",
                                   "--data-dir", tmp_path / "flat", "--device", "cpu", "--output-dir", tmp_path / "le")


def test_linear_eval_from_another_folder_than_a_relative_pretraining_data_dir(tmp_path):
    """The checkpoint records --data-dir as typed: a relative one is not found from another folder,
    and the message names where it came from (the user did not pass --data-dir)."""
    from PIL import Image
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (i * 30, c * 200, 0)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    run_script(REPO / "simclr.py", "--dataset", "imagefolder", "--data-dir", "imgs", "--image-size", "8",
               "--batch-size", "8", "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--workers", "0",
               "--knn-every", "0", "--output-dir", tmp_path / "run", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    msg = fails(REPO / "linear_eval.py", "--ckpt", tmp_path / "run" / "backbone.pt", "--device", "cpu",
                "--mode", "fast", "--workers", "0", cwd=elsewhere)
    assert msg == (f"error: the pretraining's --data-dir imgs (from {tmp_path / 'run' / 'backbone.pt'}) is not found "
                   f"from {elsewhere}; give --data-dir, or run from the folder the pretraining ran in")
    assert not (tmp_path / "run" / "linear_eval_fast" / "last.pt").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*TINY, "--epochs", "3", "--knn-every", "0", "--optimizer", "sgd", "--output-dir", tmp_path]
    run_script("simclr.py", *args, "--max-steps", "4")
    good = load(tmp_path / "last.pt")
    msg = fails("simclr.py", *args, "--temperature", "1e-30")  # logits of inf: a NaN loss
    assert "the loss is nan" in msg and "step 6" in msg
    kept = load(tmp_path / "last.pt")
    assert kept["step"] == 4 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


@pytest.mark.parametrize("script", ["simclr.py", "dino.py"])
def test_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoint(tmp_path, script):
    """A batch too large for the GPU: torch's CUDA out-of-memory error (raised here by a stand-in
    for backward(), as there is no GPU) becomes one line saying what to change; last.pt is kept."""
    args = [*TINY, "--epochs", "2", "--knn-every", "0", "--output-dir", tmp_path / "run"]
    run_script(script, *args, "--max-steps", "2")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    wrapper = tmp_path / "oom.py"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        "def backward(*args, **kwargs):\n"
        "    raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total '\n"
        "                                      'capacity of 15.77 GiB of which 1.06 GiB is free.')\n"
        "torch.Tensor.backward = backward\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n")
    msg = fails(wrapper, *args)
    assert msg == ("error: out of GPU memory with --batch-size 32 (Tried to allocate 2.50 GiB); lower --batch-size "
                   "(it is global: more GPUs also help) or use --precision bf16 or fp16")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("raised", ["allocation", "other"])
def test_out_of_host_memory_is_one_line_and_keeps_the_checkpoint(tmp_path, raised):
    """The same on the CPU, where torch's allocation failure is a plain RuntimeError: here a real one
    (32 TiB asked for in backward()) becomes one line; any other RuntimeError keeps its traceback."""
    args = [*TINY, "--epochs", "2", "--knn-every", "0", "--output-dir", tmp_path / "run"]
    run_script("simclr.py", *args, "--max-steps", "2")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    wrapper = tmp_path / "oom.py"
    fault = "torch.empty(2**45, dtype=torch.uint8)" if raised == "allocation" else "raise RuntimeError('other fault')"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        "def backward(*args, **kwargs):\n"
        f"    {fault}\n"
        "torch.Tensor.backward = backward\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    if raised == "allocation":
        assert fails(wrapper, *args) == ("error: out of host memory with --batch-size 32 (tried to allocate 32768.00 "
                                         "GiB); lower --batch-size, or run where more memory is free")
    else:
        proc = run_script(wrapper, *args, check=False)
        assert proc.returncode == 1 and "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "RuntimeError: other fault"
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_an_error_line_is_one_write_under_python_u(tmp_path):
    """Under `python -u` or PYTHONUNBUFFERED=1, Python wrote an exiting error's text and its newline
    apart, so the lines of processes sharing one stderr (torchrun's) and stopping at once ran together
    ("error: A...error: B...", then two newlines: 1 pair in 6 processes stopped together, appending to
    one file; srun forwards whole lines). Each write to this stderr is recorded: the error line must be
    a single write."""
    writes, wrapper = tmp_path / "writes.jsonl", tmp_path / "record.py"
    wrapper.write_text(
        "import io, json, runpy, sys\n"
        "class Recorder(io.RawIOBase):  # the raw stderr of python -u, recording each write\n"
        "    def writable(self):\n"
        "        return True\n"
        "    def write(self, b):\n"
        f"        with open({str(writes)!r}, 'a') as f:\n"
        "            f.write(json.dumps(bytes(b).decode()) + '\\n')\n"
        "        return len(b)\n"
        "sys.stderr = io.TextIOWrapper(Recorder(), write_through=True)  # as python -u sets it up\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-u", wrapper, *map(str, TINY), "--dataset", "imagefolder", "--data-dir",
                           missing, "--output-dir", tmp_path / "run"], env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    records = [json.loads(line) for line in writes.read_text().splitlines()]
    errors = [r for r in records if "error:" in r]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(missing) in errors[0], records
    assert errors[0].endswith("\n") and errors[0].count("\n") == 1, records


@pytest.mark.parametrize("script", ["simclr.py", "linear_eval.py"])
def test_a_script_runs_where_stderr_is_not_a_file(tmp_path, script):
    """A notebook's `%run simclr.py ...` runs the `__main__` block with a stderr that is no file
    (no reconfigure); a bad flag value still ends with its one line there."""
    wrapper = tmp_path / "notebook.py"
    wrapper.write_text(
        "import io, runpy, sys\n"
        "sys.stderr = captured = io.StringIO()\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / script)!r}\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
        "finally:\n"
        "    sys.__stderr__.write(captured.getvalue())\n")
    proc = subprocess.run([sys.executable, wrapper, "--batch-size", "1"], env=clean_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("error: argument --batch-size: must be at least 2, not 1"), proc.stderr


def test_corrupt_image_is_skipped_with_its_name(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(20):
            colour = (i * 10, 50, 0) if c == "a" else (0, 0, i * 10)
            Image.new("RGB", (16, 16), colour).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "a" / "broken.png").write_bytes(b"not an image at all")
    proc = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--val-fraction", "0.2",
                      "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--workers", "0", "--knn-every", "1",
                      "--output-dir", tmp_path / "out")
    assert "broken.png" in proc.stderr and "skipping unreadable image" in proc.stderr
    assert (tmp_path / "out" / "backbone.pt").exists()


def test_resume_a_checkpoint_of_another_method_script(tmp_path, pretrained):
    msg = fails("byol.py", *TINY, "--resume", pretrained / "last.pt", "--output-dir", tmp_path / "run")
    assert "written by simclr.py, not byol.py" in msg


def test_resume_with_another_backbone(tmp_path):
    """A DINO run with a ResNet resumed as a ViT, or a ViT with another patch size: one line."""
    from conftest import METHODS
    run = tmp_path / "run"
    run_script("dino.py", *TINY, *METHODS["dino.py"], "--arch", "vit_tiny", "--max-steps", "1", "--output-dir", run)
    before = load(run / "last.pt")
    assert "--arch vit_tiny, not resnet18" in fails("dino.py", *TINY, *METHODS["dino.py"], "--output-dir", run)
    msg = fails("dino.py", *TINY, *METHODS["dino.py"], "--arch", "vit_tiny", "--patch-size", "8", "--output-dir", run)
    assert "'patch_size': 4" in msg and "'patch_size': 8" in msg and "--patch-size" in msg
    msg = fails("dino.py", *TINY, *METHODS["dino.py"], "--arch", "vit_tiny", "--no-norm-last-layer",
                "--output-dir", run)
    assert "--norm-last-layer, not --no-norm-last-layer" in msg
    # linear_eval.py on that ViT: its patch size is the checkpoint's, and the images must tile into patches.
    probe = ["--mode", "fast", "--epochs", "1", "--device", "cpu", "--workers", "0", "--output-dir", tmp_path / "le"]
    msg = fails("linear_eval.py", "--ckpt", run / "last.pt", "--patch-size", "8", *probe)
    assert "--patch-size 8: " in msg and "holds a vit_tiny with patch size 4" in msg
    assert "--image-size 18 is not a multiple of the ViT patch size 4" in fails(
        "linear_eval.py", "--ckpt", run / "last.pt", "--image-size", "18", *probe)
    # A checkpoint of an older dino.py, which stored the prototypes' norms g as a vector: one line.
    old = tmp_path / "old"
    old.mkdir()
    for net in ("student", "teacher"):
        before["model"][f"{net}.head.last_g"] = before["model"][f"{net}.head.last_g"].flatten()
    torch.save(before, old / "last.pt")
    msg = fails("dino.py", *TINY, *METHODS["dino.py"], "--arch", "vit_tiny", "--output-dir", old)
    assert ("holds student.head.last_g of shape (256,), the model here has one of shape (256, 1): it was written by "
            "another version of the script") in msg
    after = load(run / "last.pt")
    assert all(torch.equal(before["model"][k].view_as(after["model"][k]), after["model"][k]) for k in before["model"])


def test_checkpoint_of_another_model_version_names_the_first_tensor_that_differs():
    """common.check_same_model: a missing, an extra or a reshaped tensor is one line naming it."""
    import common
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = model.state_dict()
    common.check_same_model("ok.pt", state, model)  # the same names and shapes: no error
    cases = [({k: v for k, v in state.items() if k != "1.running_var"},
              "holds no 1.running_var, the model here has one of shape (4,)"),
             ({**state, "2.weight": torch.ones(2)}, "holds 2.weight of shape (2,), the model here has none"),
             ({**state, "0.weight": torch.ones(4, 3, 1)},
              "holds 0.weight of shape (4, 3, 1), the model here has one of shape (4, 3)")]
    for saved, expected in cases:
        with pytest.raises(SystemExit) as e:
            common.check_same_model("old.pt", saved, model)
        assert str(e.value) == (f"error: old.pt {expected}: it was written by another version of the script; "
                                "resume with that version, or use another --output-dir")


@pytest.mark.parametrize("size", ["4", "12"])
def test_local_crops_not_a_multiple_of_the_patch(tmp_path, size):
    msg = fails("dino.py", *TINY, "--arch", "vit_tiny", "--patch-size", "8", "--local-crops", "2",
                "--local-crop-size", size, "--output-dir", tmp_path)
    assert f"--local-crop-size {size} is not a multiple of the ViT patch size 8" in msg


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py", "dino.py", "linear_eval.py"])
@pytest.mark.parametrize("flag,value,low", [("--batch-size", "1", 2), ("--epochs", "0", 1), ("--log-every", "0", 1),
                                            ("--save-every", "0", 1), ("--max-steps", "0", 1), ("--workers", "-1", 0),
                                            ("--seed", "-1", 0), ("--image-size", "0", 1), ("--patch-size", "0", 1)])
def test_impossible_flag_values_are_one_usage_line(script, flag, value, low, capsys):
    """Refused by argparse before anything runs (they used to end in a ZeroDivisionError mid-run,
    a loss of exactly 0 with one image per batch, or "done at step 0" with an untrained backbone)."""
    parser = __import__(script[:-3]).get_args_parser()
    required = ["--ckpt", "random"] if script == "linear_eval.py" else []
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*required, flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be at least {low}, not {value}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert getattr(parser.parse_args([*required, flag, str(low + 3)]), flag[2:].replace("-", "_")) == low + 3


def test_resume_with_another_dataset(tmp_path, pretrained):
    """A run resumed on other data would continue a schedule and a step count made for the first."""
    np.savez(tmp_path / "d.npz", train_images=np.zeros((64, 16, 16, 3), np.uint8))
    msg = fails("simclr.py", *TINY, "--dataset", "npz", "--data-dir", tmp_path / "d.npz", "--resume",
                pretrained / "last.pt", "--output-dir", tmp_path / "run")
    assert "--dataset synthetic, not npz" in msg
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_folder_resumed_without_its_dataset_is_refused_before_any_data(tmp_path, pretrained, monkeypatch):
    """`OUTPUT_DIR=runs/simclr-1 sbatch sbatch/simclr.sh` without the job's --dataset: the default,
    CIFAR-10, was downloaded (or its download failed, offline) before the checkpoint was checked."""
    import common
    import simclr

    def load_nothing(args):
        raise AssertionError(f"data loaded: {args.dataset}")
    monkeypatch.setattr(common, "download_data", load_nothing)
    monkeypatch.setattr(common, "load_data", load_nothing)
    with pytest.raises(SystemExit) as e:
        main_in_this_process(simclr, ["--device", "cpu", "--resume", pretrained / "last.pt", "--output-dir",
                                      tmp_path / "run"], monkeypatch)
    assert str(e.value) == (f"error: {pretrained / 'last.pt'} was trained with --dataset synthetic, not cifar10: use "
                            "the same value to resume, or another --output-dir")


def test_checkpoint_path_that_is_a_folder_or_a_csv(tmp_path, pretrained):
    import simclr
    with pytest.raises(SystemExit, match=f"{pretrained} is a folder; give the file, such as {pretrained}/last.pt"):
        simclr.load_checkpoint(pretrained)
    with pytest.raises(SystemExit, match="is not a readable checkpoint .*another kind of file") as e:
        simclr.load_checkpoint(pretrained / "metrics.csv")
    assert "pickled" not in str(e.value)
    # torch.save's old (not zip) format, holding an object: refused as such
    torch.save({"backbone": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(SystemExit, match="holds pickled Python objects"):
        simclr.load_checkpoint(tmp_path / "old.pt")


def test_pack_a_folder_without_one_readable_image(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(b"not a png")
    proc = run_script("common.py", "pack", "--data-dir", tmp_path / "data", "--out", tmp_path / "out",
                      "--image-size", "8", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: none of the 1 test images")
    assert not list((tmp_path / "out").glob("*.npy"))


@pytest.mark.parametrize("script,flag,value,message", [
    ("simclr.py", "--temperature", "0", "more than 0"), ("dino.py", "--student-temp", "-1", "more than 0"),
    ("dino.py", "--teacher-temp", "0", "more than 0"), ("barlow.py", "--scale-loss", "0", "more than 0"),
    ("byol.py", "--base-tau", "1.5", "between 0 and 1"), ("dino.py", "--momentum-teacher", "2", "between 0 and 1"),
    ("dino.py", "--drop-path", "-0.5", "between 0 and 1"), ("barlow.py", "--lr-biases", "-1", "at least 0"),
    ("simclr.py", "--lr", "-1", "at least 0"), ("dino.py", "--weight-decay", "-0.1", "at least 0")])
def test_impossible_method_values_are_one_usage_line(script, flag, value, message, capsys):
    parser = __import__(script[:-3]).get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([flag, value])
    assert f"argument {flag}: must be {message}, not {value}" in capsys.readouterr().err


SCALES = [("--global-crops-scale", ["0.9", "0.2"]), ("--global-crops-scale", ["-1", "0.5"]),
          ("--local-crops-scale", ["0.4", "0.05"]), ("--local-crops-scale", ["0", "0.4"])]  # an empty crop


@pytest.mark.parametrize("flag,scale", SCALES)
def test_dino_crop_scales_out_of_order_or_range(flag, scale):
    import dino
    args = dino.get_args_parser().parse_args([*TINY, "--local-crops", "2", flag, *scale])
    args.image_size = 16
    with pytest.raises(SystemExit, match=f"{flag} {float(scale[0])} {float(scale[1])}: give the smallest"):
        dino.fill_recipe(args)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_folder_of_unreadable_images_is_one_line(tmp_path, workers):
    """A half-copied dataset (every file empty): stopped with one line naming the folder's files, also
    when a loader process finds it (its traceback is not shown)."""
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / c / f"{i}.jpg").write_bytes(b"")
    msg = fails("simclr.py", "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--image-size", "8",
                "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--workers", workers,
                "--output-dir", tmp_path / "run")
    assert msg.startswith("error: ") and "unreadable images in a row from" in msg and str(tmp_path / "data") in msg
    assert not (tmp_path / "run" / "last.pt").exists()


def test_linear_eval_unreadable_images_found_by_a_loader_process_are_one_line(tmp_path):
    """linear_eval.py's own handler: more than 100 unreadable images in a row found by a loader
    process (the first image, read for the image size, is fine) end in one line, no traceback. The
    loader process may still warn of the next unreadable files (the batch it was loading ahead)
    until it is stopped, after that line: those lines are warnings only."""
    from PIL import Image
    for split, n_bad in (("train", 120), ("val", 0)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (200 if c == "a" else 0, 0, 0)).save(tmp_path / "data" / split / c / "000.png")
            for i in range(1, n_bad + 1):
                (tmp_path / "data" / split / c / f"{i:03d}.jpg").write_bytes(b"")
    proc = run_script("linear_eval.py", "--ckpt", "random", "--dataset", "imagefolder", "--data-dir", tmp_path / "data",
                      "--image-size", "8", "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--workers", "1",
                      "--output-dir", tmp_path / "probe", check=False)
    lines = proc.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    msg = lines[errors[0]]
    assert msg.startswith("error: 100 unreadable images in a row from") and str(tmp_path / "data") in msg
    assert all(line.startswith("warning: skipping unreadable image") for line in lines[errors[0] + 1:])


def test_torchvision_018_with_numpy_2_is_one_line_before_the_pil_loader(monkeypatch, tmp_path):
    """torchvision 0.18 (torch 2.3) computes hue shifts with np.uint8 of a negative number, an
    OverflowError under numpy 2 in a loader process; the batched path does not use that code."""
    import types
    import common
    from PIL import Image
    images, labels = common.synthetic_images(16, size=8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    files = common.ImageSet(files=sorted(tmp_path.glob("*.png")), labels=labels)
    views = [common.simclr_augmentation(8, (0.5,) * 3, (0.2,) * 3)] * 2
    args = types.SimpleNamespace(aug_device="auto", dataset="imagefolder", seed=0, workers=0)
    monkeypatch.setattr(common.torchvision, "__version__", "0.18.1+cu121")
    monkeypatch.setattr(common.np, "__version__", "2.1.3")
    with pytest.raises(SystemExit, match=r"torchvision 0.18.1\+cu121 predates numpy 2: .*pip install 'numpy<2'"):
        common.pretrain_loader(files, views, 8, 1, 0, args, torch.device("cpu"))
    in_memory = common.ImageSet(images=images, labels=labels)
    assert isinstance(common.pretrain_loader(in_memory, views, 8, 1, 0, args, torch.device("cpu")), common.DeviceLoader)
    probe = [common.probe_transform(8, (0.5,) * 3, (0.2,) * 3)]  # no colour jitter: linear_eval.py runs
    (x,), _ = next(iter(common.pretrain_loader(files, probe, 8, 1, 0, args, torch.device("cpu"))))
    assert x.shape == (8, 3, 8, 8)
    for torchvision_version, numpy_version in (("0.18.1+cu121", "1.26.4"), ("0.19.0", "2.1.3")):  # both work
        monkeypatch.setattr(common.torchvision, "__version__", torchvision_version)
        monkeypatch.setattr(common.np, "__version__", numpy_version)
        x1, x2 = next(iter(common.pretrain_loader(files, views, 8, 1, 0, args, torch.device("cpu"))))[0]
        assert x1.shape == x2.shape == (8, 3, 8, 8)


def test_resume_with_other_optimizer_settings_seed_or_images(tmp_path, pretrained):
    """The optimizer's saved state holds its weight decay, eta and clip, so a changed flag would be
    silently ignored on resume: it is refused, naming both values as typed on the command line. So
    are another seed (another data order in the middle of an epoch) and other images."""
    run_dir = tmp_path / "run"
    for flags, message in ((["--weight-decay", "0.001"], "--weight-decay 0.0001, not 0.001"),
                           (["--lars-eta", "0.001"], "--lars-eta 0.02, not 0.001"),
                           (["--no-lars-clip"], "--lars-clip, not --no-lars-clip"),
                           (["--seed", "1"], "--seed 0, not 1"),
                           (["--batch-size", "64"], "--batch-size 32, not 64"),  # same shapes, another run
                           (["--image-size", "16"], "--image-size 8, not 16"),
                           (["--synthetic-size", "256", "64"], "trained on 128 images, these data hold 256")):
        msg = fails("simclr.py", *TINY, *flags, "--epochs", "3", "--resume", pretrained / "last.pt",
                    "--output-dir", run_dir)
        assert message in msg and "to resume" in msg, msg
    assert not (run_dir / "last.pt").exists()
    # With SGD, LARS's eta plays no part; a checkpoint from before a flag existed is not checked for it.
    old = load(pretrained / "last.pt")
    del old["args"]["lars_clip"]
    torch.save(old, tmp_path / "old.pt")
    run_script("simclr.py", *TINY, "--no-lars-clip", "--epochs", "3", "--knn-every", "0", "--resume",
               tmp_path / "old.pt", "--output-dir", run_dir)
    assert load(run_dir / "last.pt")["step"] == 12


@pytest.mark.parametrize("script,flags,message", [
    ("byol.py", ["--weight-decay", "0.001"], "--weight-decay 1e-05, not 0.001"),
    ("byol.py", ["--seed", "1"], "--seed 0, not 1"),
    ("barlow.py", ["--weight-decay", "0.001"], "--weight-decay 0.0001, not 0.001"),
    ("barlow.py", ["--seed", "1"], "--seed 0, not 1"),
    ("dino.py", ["--optimizer", "sgd"], "--optimizer lars, not sgd"),
    ("dino.py", ["--seed", "1"], "--seed 0, not 1")])
def test_each_method_refuses_a_resume_with_other_run_settings_or_a_backbone(script, flags, message):
    """Each script's check_resumable (test_resume_with_other_optimizer_settings_seed_or_images runs
    simclr.py's): the flags the optimizer's state or the data order carry, and a backbone-only file."""
    import dino
    from conftest import METHODS
    module = __import__(script[:-3])

    def parse(extra):
        args = module.get_args_parser().parse_args([*TINY, *METHODS[script], *extra])
        if module is dino:
            dino.fill_recipe(args)
        return args

    saved = parse([])
    model = getattr(module, {"byol.py": "BYOL", "barlow.py": "BarlowTwins", "dino.py": "DINO"}[script])(saved, 8)
    ckpt = {"method": script[:-3], "args": vars(saved), "model": model.state_dict(),
            "backbone_meta": model.backbone_meta, "num_images": 128}
    module.check_resumable(ckpt, "last.pt", saved, model, 128)  # the same run: resumed
    with pytest.raises(SystemExit, match="error: last.pt was trained with " + message):
        module.check_resumable(ckpt, "last.pt", parse(flags), model, 128)
    with pytest.raises(SystemExit, match="holds only a backbone"):
        module.check_resumable({k: v for k, v in ckpt.items() if k != "model"}, "last.pt", saved, model, 128)


def test_linear_eval_resume_with_other_settings(tmp_path, pretrained):
    args = ["--ckpt", pretrained / "backbone.pt", "--mode", "fast", "--epochs", "2", "--batch-size", "32",
            "--device", "cpu", "--workers", "0", "--output-dir", tmp_path / "probe"]
    run_script("linear_eval.py", *args, "--max-steps", "1")
    assert "--weight-decay 0.0, not 0.1" in fails("linear_eval.py", *args, "--weight-decay", "0.1")
    # A fast probe where a linear one goes now (until 2026-12-01 both modes shared linear_eval/): "use the same
    # value" sent the user to the fast probe's new default folder, where a new probe started
    assert fails("linear_eval.py", *args, "--mode", "linear") == (
        f"error: {tmp_path / 'probe' / 'last.pt'} is a probe of --mode fast: to go on with it, give --mode fast "
        f"--output-dir {tmp_path / 'probe'}; for a --mode linear probe, give another --output-dir")
    # The same probe given by --resume to another folder: what blocks a linear probe there is --resume
    assert fails("linear_eval.py", *args[:-1], tmp_path / "elsewhere", "--resume", tmp_path / "probe" / "last.pt",
                 "--mode", "linear") == (f"error: {tmp_path / 'probe' / 'last.pt'} is a probe of --mode fast: to go on "
                                         "with it, give --mode fast; for a --mode linear probe, drop --resume")
    assert "--image-size 8, not 32" in fails("linear_eval.py", *args, "--image-size", "32")
    assert "--batch-size 32, not 16" in fails("linear_eval.py", *args, "--batch-size", "16")
    assert "--seed 0, not 1" in fails("linear_eval.py", *args, "--seed", "1")
    random = ["--ckpt", "random", "--dataset", "synthetic", "--synthetic-size", "64", "32", *args[2:-1], tmp_path / "r"]
    run_script("linear_eval.py", *random, "--max-steps", "1")
    assert "--arch resnet18, not resnet34" in fails("linear_eval.py", *random, "--arch", "resnet34")
    run_script("linear_eval.py", *args)  # the same flags resume
    (tmp_path / "probe" / "last.pt").replace(tmp_path / "probe.pt")
    torch.save(load(pretrained / "last.pt"), tmp_path / "probe" / "last.pt")
    assert "written by simclr.py, not linear_eval.py" in fails("linear_eval.py", *args)


def test_linear_eval_does_not_resume_a_probe_of_another_backbone_or_other_images(tmp_path, pretrained):
    """The probe's folder sits beside --ckpt: when pretraining goes on and writes --ckpt again, the
    same command must not score the old linear layer on the new backbone (nor on other images)."""
    ckpt = tmp_path / "run" / "backbone.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((pretrained / "backbone.pt").read_bytes())
    args = ["--ckpt", ckpt, "--mode", "fast", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--workers",
            "0"]
    run_script("linear_eval.py", *args, "--max-steps", "1")
    probe = tmp_path / "run" / "linear_eval_fast" / "last.pt"
    before = probe.read_bytes()
    newer = load(ckpt)
    newer["backbone"]["conv1.weight"] += 0.01  # pretraining went on
    torch.save(newer, ckpt)
    assert fails("linear_eval.py", *args) == (
        f"error: {probe} is a probe of another backbone than the one {ckpt} holds now (it was written again "
        f"since?): delete {probe.parent} to probe the new one, or give another --output-dir")
    spelled = f"{ckpt.parent}/./{ckpt.name}"  # the same file, named otherwise (pathlib would drop the "./")
    assert fails("linear_eval.py", "--ckpt", spelled, *args[2:], "--output-dir", probe.parent).startswith(
        f"error: {probe} is a probe of another backbone than the one {spelled} holds now (it was written again since?)")
    assert probe.read_bytes() == before
    rng = np.random.default_rng(0)
    for name, n in (("a.npz", 64), ("b.npz", 96)):
        np.savez(tmp_path / name, train_images=rng.integers(0, 255, (n, 8, 8, 3), np.uint8),
                 train_labels=np.arange(n) % 4, test_images=rng.integers(0, 255, (32, 8, 8, 3), np.uint8),
                 test_labels=np.arange(32) % 4)
    random = ["--ckpt", "random", "--dataset", "npz", *args[2:], "--output-dir", tmp_path / "r", "--data-dir"]
    run_script("linear_eval.py", *random, tmp_path / "a.npz", "--max-steps", "1")
    run_script("linear_eval.py", *random, tmp_path / "a.npz", "--max-steps", "2")  # the same images resume
    assert fails("linear_eval.py", *random, tmp_path / "b.npz") == (
        f"error: {tmp_path / 'r' / 'last.pt'} is a probe trained on 64 images, these data hold 96: use the same "
        "images to resume, or another --output-dir")


def test_a_probe_resumes_on_the_same_backbone_from_another_file_and_names_the_file_of_another(tmp_path, pretrained):
    """A run's backbone.pt and last.pt hold the same backbone and share the probe's default folder: a
    probe of one goes on with the other (it compared --ckpt's path and refused). Another backbone is
    refused, naming the file the probe was trained on."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("backbone.pt", "last.pt"):
        (run / name).write_bytes((pretrained / name).read_bytes())
    args = ["--mode", "fast", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--workers", "0"]
    run_script("linear_eval.py", "--ckpt", run / "backbone.pt", *args, "--max-steps", "1")
    out = run_script("linear_eval.py", "--ckpt", run / "last.pt", *args).stdout
    probe = run / "linear_eval_fast"
    assert f"resumed from {probe / 'last.pt'} at step 1" in out, out
    assert json.loads((probe / "results.json").read_text())["ckpt"] == str(run / "last.pt")
    other = load(run / "last.pt")
    other["backbone"]["conv1.weight"] += 0.01
    torch.save(other, tmp_path / "other.pt")
    assert fails("linear_eval.py", "--ckpt", tmp_path / "other.pt", *args, "--output-dir", probe) == (
        f"error: {probe / 'last.pt'} is a probe of another backbone than the one {tmp_path / 'other.pt'} holds now "
        f"(the probe is of --ckpt {run / 'last.pt'}): delete {probe} to probe the new one, or give another "
        "--output-dir")


def test_barlow_bias_learning_rate_follows_the_command_line_on_resume(tmp_path):
    """--lr-biases is kept in the optimizer as a fraction of --lr; a resumed run with another --lr
    still gives the biases the --lr-biases asked for (torch's load_state_dict restored the old fraction)."""
    from conftest import METHODS
    run = ["barlow.py", *TINY, *METHODS["barlow.py"], "--knn-every", "0", "--lr-biases", "0.0048", "--output-dir",
           tmp_path]
    run_script(*run, "--lr", "0.2", "--max-steps", "1")
    run_script(*run, "--lr", "0.1", "--max-steps", "2")
    groups = load(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert groups[1]["lr_scale"] == pytest.approx(0.048) and groups[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--val-fraction", "nan"),
                                        ("--temperature", "inf")])
def test_nan_and_inf_flag_values_are_refused(flag, value):
    proc = run_script("simclr.py", *TINY, flag, value, check=False)
    assert proc.returncode == 2 and f"argument {flag}: must be" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script,flag", [("barlow", "--lambd"), ("dino", "--clip-grad")])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_infinite_values_of_flags_without_an_upper_bound_are_refused(script, flag, value, capsys):
    """No upper bound refuses inf for these two (a Barlow loss of inf, clipping that never clips): the
    finite check alone does."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).get_args_parser().parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be at least 0, not {value}" in capsys.readouterr().err


def test_fractions_take_both_ends():
    """0 and 1 are fractions (--momentum-teacher 1 keeps the teacher fixed, --blur-prob 1 blurs every
    view); only values outside are refused."""
    import common
    assert [common.fraction(v) for v in ("0", "1", "1.0", "0.25")] == [0, 1, 1, 0.25]
    dino = importlib.import_module("dino")
    assert dino.get_args_parser().parse_args(["--momentum-teacher", "1"]).momentum_teacher == 1
    for value in ("-0.01", "1.01", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be between 0 and 1, not {value}"):
            common.fraction(value)


@pytest.mark.parametrize("script,flags", [("simclr", ["--lr", "--weight-decay"]), ("byol", ["--lr", "--weight-decay"]),
                                          ("barlow", ["--lr", "--lr-biases", "--weight-decay"]),
                                          ("dino", ["--lr", "--min-lr", "--weight-decay", "--weight-decay-end"]),
                                          ("linear_eval", ["--lr", "--weight-decay"])])
def test_huge_rates_are_refused(script, flags, capsys):
    """A learning rate or weight decay past float32's range, once scaled, was an overflow traceback
    from inside the optimizer at the first step; now a usage line. 1e4 itself still parses."""
    parser = importlib.import_module(script).get_args_parser()
    required = ["--ckpt", "x.pt"] if script == "linear_eval" else []
    for flag in flags:
        assert getattr(parser.parse_args([*required, flag, "1e4"]), flag[2:].replace("-", "_")) == 1e4
        with pytest.raises(SystemExit):
            parser.parse_args([*required, flag, "1e300"])
        assert f"argument {flag}: must be at most 10000, not 1e300" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["simclr", "byol", "barlow", "dino", "linear_eval"])
def test_a_seed_past_numpy_range_is_a_usage_line(script, capsys):
    """numpy's seed must be below 2**32: a larger --seed was a ValueError traceback at the start."""
    parser = importlib.import_module(script).get_args_parser()
    required = ["--ckpt", "x.pt"] if script == "linear_eval" else []
    assert parser.parse_args([*required, "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--seed", str(2**32)])
    assert "argument --seed: must be at most 4294967295, not 4294967296" in capsys.readouterr().err


def test_linear_eval_arch_of_another_backbone_than_the_checkpoints_is_one_line(tmp_path, pretrained):
    """--arch is for --ckpt random: with a checkpoint it was ignored (the checkpoint's backbone was
    evaluated) yet recorded in args.json, and then blocked the same command without it."""
    msg = fails("linear_eval.py", "--ckpt", pretrained / "last.pt", "--arch", "vit_small", "--device", "cpu",
                "--output-dir", tmp_path / "probe")
    assert msg == f"error: --arch vit_small: {pretrained / 'last.pt'} holds a resnet18; drop the flag"
    run_script("linear_eval.py", "--ckpt", pretrained / "last.pt", "--arch", "resnet18", "--device", "cpu",
               "--workers", "0", "--batch-size", "32", "--mode", "fast", "--epochs", "1",
               "--output-dir", tmp_path / "p")
    assert json.loads((tmp_path / "p" / "args.json").read_text())["arch"] == "resnet18"


def test_linear_eval_resume_of_a_pretraining_checkpoint_says_to_change_resume(tmp_path, pretrained):
    """--resume of a pretraining last.pt (the probe's own flag, confused with --ckpt): the fix is --resume,
    not another --output-dir, which would read the same --resume."""
    msg = fails("linear_eval.py", "--ckpt", pretrained / "last.pt", "--resume", pretrained / "last.pt", "--device",
                "cpu", "--output-dir", tmp_path / "probe")
    assert msg == (f"error: {pretrained / 'last.pt'} was written by simclr.py, not linear_eval.py: --resume takes a "
                   "probe's last.pt (the pretraining checkpoint goes to --ckpt); change or drop it")


def test_weights_that_became_nan_are_not_saved(tmp_path):
    """A step whose loss is finite can still leave NaN weights (an update too large; made here by a
    stand-in optimizer step): saving them would replace a good last.pt. One line, last.pt kept."""
    args = [*TINY, "--epochs", "3", "--knn-every", "0", "--optimizer", "sgd", "--output-dir", tmp_path / "run"]
    run_script("simclr.py", *args, "--max-steps", "4")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    wrapper = tmp_path / "nan_step.py"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        "step = torch.optim.SGD.step\n"
        "def nan_step(self, *a, **k):\n"
        "    out = step(self, *a, **k)\n"
        "    self.param_groups[0]['params'][0].data.fill_(float('nan'))\n"
        "    return out\n"
        "torch.optim.SGD.step = nan_step\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    msg = fails(wrapper, *args, "--max-steps", "5")
    assert msg == (f"error: the weights became NaN or inf by step 5: stopped, {tmp_path / 'run' / 'last.pt'} is kept; "
                   "lower --lr, use --precision fp32, or check the data")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert "nothing was saved" in fails(wrapper, *args, "--max-steps", "1", "--output-dir", tmp_path / "new")
    assert not (tmp_path / "new" / "last.pt").exists() and not (tmp_path / "new" / "backbone.pt").exists()


def test_linear_eval_refuses_a_diverged_or_unknown_backbone(tmp_path, pretrained):
    ckpt = load(pretrained / "backbone.pt")
    name = next(k for k, v in ckpt["backbone"].items() if v.is_floating_point())
    ckpt["backbone"][name] = torch.full_like(ckpt["backbone"][name], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    le = ["--device", "cpu", "--workers", "0", "--mode", "fast", "--output-dir", tmp_path / "le"]
    assert "holds NaN or inf weights" in fails("linear_eval.py", "--ckpt", tmp_path / "nan.pt", *le)
    ckpt = load(pretrained / "backbone.pt")
    ckpt["backbone_meta"]["arch"] = "resnet99"
    torch.save(ckpt, tmp_path / "r99.pt")
    assert "a backbone 'resnet99', which this linear_eval.py does not build" in fails(
        "linear_eval.py", "--ckpt", tmp_path / "r99.pt", *le)


def test_resuming_from_a_linear_eval_checkpoint_names_it(tmp_path, pretrained):
    run_script("linear_eval.py", "--ckpt", pretrained / "backbone.pt", "--device", "cpu", "--workers", "0",
               "--mode", "fast", "--epochs", "1", "--batch-size", "32", "--output-dir", tmp_path / "le")
    assert "was written by linear_eval.py, not simclr.py" in fails(
        "simclr.py", *TINY, "--resume", tmp_path / "le" / "last.pt", "--output-dir", tmp_path / "run")


@pytest.mark.parametrize("env,named", [
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}, "'SLURM_LOCALID' is not set"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "abc"}, "not a number"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "(MASTER_ADDR or MASTER_PORT is not set)"),
    ({"RANK": "1", "LOCAL_RANK": "1"}, "'WORLD_SIZE' is not set"), ({"WORLD_SIZE": "2"}, "'RANK' is not set")])
def test_incomplete_launcher_variables_are_one_line(env, named):
    from conftest import clean_env
    proc = run_script("simclr.py", *TINY, env=clean_env(**env), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert named in proc.stderr and "start with torchrun or srun" in proc.stderr


@pytest.mark.parametrize("damage,named", [
    (lambda f: f.write_bytes(b"kind,epoch,step\n1,2,3\n\xff\xfe\n"), "can't decode"),
    (lambda f: f.write_text("step,0,1,4.1,0.1,5,5,,1\nstep,0,2,4.0,0.1,5,5,,2\n"), "is not the header"),
    (lambda f: (f.unlink(), f.mkdir()), "Is a directory")])
def test_a_damaged_metrics_csv_on_resume_is_one_line(tmp_path, damage, named):
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--knn-every", "0", "--output-dir", out]
    run_script("simclr.py", *args, "--max-steps", "2")
    before = (out / "last.pt").read_bytes()
    damage(out / "metrics.csv")
    msg = fails("simclr.py", *args, "--max-steps", "4")
    assert msg.startswith(f"error: cannot rewrite {out / 'metrics.csv'} on resume") and named in msg, msg
    assert (out / "last.pt").read_bytes() == before and not (out / "metrics.csv.tmp").exists()


def test_dino_local_crops_must_be_smaller_than_the_global_ones(tmp_path):
    msg = fails("dino.py", *TINY, *["--local-crops", "2", "--local-crop-size", "8"], "--output-dir", tmp_path)
    assert "--local-crop-size 8 is not smaller than the 8 px global crops; give a smaller one" in msg
    # Left out, its default (at least 8 px) cannot fit 8 px images: "leave it out" would not help.
    msg = fails("dino.py", *TINY, "--local-crops", "2", "--output-dir", tmp_path)
    assert msg.startswith("error: --local-crop-size 8 is not smaller than the 8 px global crops (its default") and \
        msg.endswith("give a larger --image-size, or --local-crops 0"), msg


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in fails("simclr.py", *TINY, "--output-dir", tmp_path / "afile")


def test_resume_flag_beside_an_existing_last_pt_says_it_is_not_used(tmp_path, pretrained):
    out = tmp_path / "run"
    run_script("simclr.py", *TINY, "--epochs", "3", "--knn-every", "0", "--output-dir", out, "--max-steps", "2")
    proc = run_script("simclr.py", *TINY, "--epochs", "3", "--knn-every", "0", "--output-dir", out, "--max-steps", "3",
                      "--resume", pretrained / "last.pt")
    assert f"note: --resume {pretrained / 'last.pt'} is not used: {out / 'last.pt'} exists" in proc.stdout
    assert "at step 2" in proc.stdout


def test_linear_eval_resume_flag_beside_an_existing_last_pt_is_not_used(tmp_path, pretrained):
    """The probe's own last.pt wins over --resume (a requeued job given --resume goes on from its last
    save, not from the start again), and the user is told so."""
    out = tmp_path / "probe"
    args = ["--ckpt", pretrained / "backbone.pt", "--mode", "fast", "--epochs", "2", "--batch-size", "32", "--device",
            "cpu", "--workers", "0", "--knn-every", "0", "--output-dir", out]
    run_script("linear_eval.py", *args, "--max-steps", "2")
    earlier = load(out / "last.pt")
    earlier["step"] = 1
    torch.save(earlier, tmp_path / "earlier.pt")
    proc = run_script("linear_eval.py", *args, "--max-steps", "3", "--resume", tmp_path / "earlier.pt")
    assert f"note: --resume {tmp_path / 'earlier.pt'} is not used: {out / 'last.pt'} exists" in proc.stdout
    assert f"resumed from {out / 'last.pt'} at step 2" in proc.stdout and load(out / "last.pt")["step"] == 3


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py", "dino.py", "linear_eval.py"])
def test_the_start_up_barrier_waits_in_the_preemption_group(monkeypatch, script):
    """On GPUs the start-up barrier runs in Preemption's gloo group (None, the default gloo group, on
    CPUs): an NCCL barrier would form NCCL's connections there, and any failure to (two processes
    on one GPU, the network) was reported as "process 0 is gone", by process 0 too."""
    import torch.distributed as dist
    module = importlib.import_module(script[:-3])
    assert "    wait_for_rank0(world_size, preemption.group)\n" in (REPO / script).read_text()
    seen = []

    def barrier(group=None):
        seen.append(group)
        raise RuntimeError("NCCL error: Duplicate GPU detected")

    monkeypatch.setattr(dist, "barrier", barrier)
    for rank, line in ((1, "error: process 1 stops: process 0 is gone (its error is above)"),
                       (0, "error: process 0 stops: another process is gone (its error is above)")):
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        with pytest.raises(SystemExit) as stop:
            module.wait_for_rank0(2, "gloo group")
        assert str(stop.value) == line
    assert seen == ["gloo group"] * 2


@pytest.mark.parametrize("script", ["simclr.py", "linear_eval.py"])
def test_a_start_up_error_of_process_0_is_one_line_in_every_process(tmp_path, pretrained, script):
    """2 processes (torchrun's variables; srun's are alike): process 0 alone checks the output folder
    (and downloads) while the other waits; when it stops, the other says so in one line instead of
    a traceback from its barrier."""
    (tmp_path / "file").write_text("")
    args = ([*TINY, "--epochs", "1"] if script == "simclr.py" else
            ["--ckpt", pretrained / "last.pt", "--device", "cpu", "--workers", "0", "--batch-size", "32"])
    port = free_port()
    procs = [Started(script, *args, "--output-dir", tmp_path / "file", env=clean_env(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        for r in range(2)]
    codes = [p.wait(120) for p in procs]
    assert codes == [1, 1], [p.output for p in procs]
    for p, line in zip(procs, [f"error: --output-dir {tmp_path / 'file'} is a file, not a folder; give a folder",
                               "error: process 1 stops: process 0 is gone (its error is above)"]):
        assert "Traceback" not in p.output and p.output.strip().splitlines()[-1] == line, p.output
