"""Stopping and starting again gives bitwise the same run as not stopping (CPU, --deterministic)."""
import csv
import json

import pytest
import torch
from PIL import Image

from conftest import DINO_VIT, METHODS, TINY, load, run_script

ARGS = [*TINY, "--epochs", "2", "--deterministic", "--knn-every", "0"]  # 4 steps per epoch


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script,stop_at", [("simclr.py", 3), ("simclr.py", 4), ("byol.py", 3), ("barlow.py", 3),
                                            ("dino.py", 3), ("dino_vit", 5), ("simclr_pil", 3)])
def test_resume_is_exact(tmp_path, script, stop_at):
    """Stopped in the middle of an epoch (3) or at its end (4). BYOL: the target network and the
    momentum schedule (a function of the saved step) continue exactly too. DINO: the teacher, the
    centre, the temperature, momentum and weight-decay schedules; with a ViT, drop path and
    gradient checkpointing, and the last layer frozen in epoch 0 only (stopped after it).
    simclr_pil: the PIL pipeline in loader processes (--aug-device cpu, 2 workers) instead of the
    batched augmentation."""
    extra = {"dino_vit": DINO_VIT, "simclr_pil": ["--aug-device", "cpu", "--workers", "2"]}
    args = [*ARGS, *(extra.get(script) or METHODS[script])]
    script = {"dino_vit": "dino.py", "simclr_pil": "simclr.py"}.get(script, script)
    run_script(script, *args, "--max-steps", 6, "--output-dir", tmp_path / "straight")
    run_script(script, *args, "--max-steps", stop_at, "--output-dir", tmp_path / "resumed")
    proc = run_script(script, *args, "--max-steps", 6, "--output-dir", tmp_path / "resumed")
    assert f"resumed from {tmp_path / 'resumed' / 'last.pt'} at step {stop_at}" in proc.stdout
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert any(k.startswith(("target.", "teacher.")) for k in a["model"]) == (script in ("byol.py", "dino.py"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    if script == "dino.py":
        assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"]) and a["dino_loss"]["center"].any()
    # metrics.csv: every (kind, step) once, and the same epoch loss as the uninterrupted run.
    logged = rows(tmp_path / "resumed" / "metrics.csv")
    assert len({(r["kind"], r["step"]) for r in logged}) == len(logged)
    epoch_rows = [[r["loss"] for r in rows(tmp_path / d / "metrics.csv") if r["kind"] == "epoch"]
                  for d in ("straight", "resumed")]
    assert epoch_rows[0] == epoch_rows[1] and len(epoch_rows[0]) == 1


@pytest.mark.parametrize("tail", ["step,1,9,1.0,0.1,1,1,,1\n", "step,0,", "step,0,2,0.5"])
def test_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path, tail):
    """A run killed after logging step 9 but before saving it leaves rows the resumed run redoes;
    one killed while writing a row leaves half a row (no newline), which must not stop the resume."""
    out = tmp_path / "run"
    run_script("simclr.py", *ARGS, "--max-steps", 2, "--output-dir", out)
    with open(out / "metrics.csv", "a") as f:
        f.write(tail)
    run_script("simclr.py", *ARGS, "--max-steps", 4, "--output-dir", out)
    logged = rows(out / "metrics.csv")
    assert [int(r["step"]) for r in logged if r["kind"] == "step"] == [2, 4]
    assert all(None not in r.values() and r["loss"] for r in logged)


def test_resume_from_another_folder_keeps_none_of_this_folders_rows_and_names_changed_flags(tmp_path):
    """--resume A/last.pt into B, whose own run left rows but no last.pt (lost before its first
    save): B's rows are another run's, not the early steps of this one. A changed flag that may
    change (the temperature) is named with its old value, as args.json will hold only the new one."""
    run_script("simclr.py", *ARGS, "--max-steps", 4, "--output-dir", tmp_path / "a")
    run_script("simclr.py", *ARGS, "--max-steps", 2, "--output-dir", tmp_path / "b")
    (tmp_path / "b" / "last.pt").unlink()
    proc = run_script("simclr.py", *ARGS, "--max-steps", 6, "--temperature", "0.5", "--resume",
                      tmp_path / "a" / "last.pt", "--output-dir", tmp_path / "b")
    assert (f"note: {tmp_path / 'a' / 'last.pt'} continues with other values of --temperature 0.5 (was 0.2), "
            "--max-steps 6 (was 4)\n") in proc.stdout
    assert [int(r["step"]) for r in rows(tmp_path / "b" / "metrics.csv")] == [6]  # steps 5-6 in one row
    proc = run_script("simclr.py", *ARGS, "--max-steps", 6, "--temperature", "0.5", "--output-dir", tmp_path / "b")
    assert "note:" not in proc.stdout and len(rows(tmp_path / "b" / "metrics.csv")) == 1  # its own row stays


def test_values_given_again_as_typed_are_no_change(capsys):
    """common.note_changed_flags: a pair filled in as a tuple (DINO's crop scales) and typed on the
    command line as a list is the same value, not a change to note; --output-dir and --resume are
    not flags of the run."""
    import argparse
    import common
    saved = {"global_crops_scale": (0.4, 1.0), "lr": 0.1, "output_dir": "a", "resume": None}
    args = argparse.Namespace(global_crops_scale=[0.4, 1.0], lr=0.1, output_dir="b", resume="a/last.pt")
    common.note_changed_flags("a/last.pt", saved, args)
    assert capsys.readouterr().out == ""
    args.global_crops_scale, args.lr = [0.3, 1.0], 0.2
    common.note_changed_flags("a/last.pt", saved, args)
    assert capsys.readouterr().out == ("note: a/last.pt continues with other values of --global-crops-scale "
                                       "[0.3, 1.0] (was [0.4, 1.0]), --lr 0.2 (was 0.1)\n")
    saved["max_steps"], args.max_steps, args.lr = 10, None, 0.1  # a flag left out: not "None", which none types
    common.note_changed_flags("a/last.pt", saved, args)
    assert capsys.readouterr().out == ("note: a/last.pt continues with other values of --global-crops-scale "
                                       "[0.3, 1.0] (was [0.4, 1.0]), --max-steps not given (was 10)\n")


@pytest.mark.parametrize("max_steps", [2, None])
def test_finished_run_started_again_does_nothing_more(tmp_path, max_steps):
    """Its last.pt is saved again as it was: the weights, and the epoch of its last step (it was
    saved as epoch 0, the epoch loop not run)."""
    limit = ["--max-steps", max_steps] if max_steps else []
    run_script("simclr.py", *ARGS, *limit, "--output-dir", tmp_path)
    before = load(tmp_path / "last.pt")
    proc = run_script("simclr.py", *ARGS, *limit, "--output-dir", tmp_path)
    assert f"done at step {max_steps or 8}" in proc.stdout
    after = load(tmp_path / "last.pt")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["epoch"] == after["epoch"] == (0 if max_steps else 1) and before["step"] == after["step"]


@pytest.mark.parametrize("script", ["simclr.py", "dino.py"])
def test_finished_run_started_again_with_other_flags_keeps_its_own(tmp_path, script):
    """A sweep's script given another element's index resumed a finished run with its --lr and
    temperature: nothing was trained with them, yet last.pt, backbone.pt and args.json were saved again
    as trained so (a real SLURM sweep). The run keeps its flags and says so; a moved --data-dir is no
    change of the run."""
    temperature = "--temperature" if script == "simclr.py" else "--teacher-temp"
    run_script(script, *ARGS, *METHODS[script], "--output-dir", tmp_path)
    trained = load(tmp_path / "last.pt")["args"]
    proc = run_script(script, *ARGS, *METHODS[script], "--lr", "2.0", temperature, "0.5", "--knn-every", "1",
                      "--output-dir", tmp_path)
    name = temperature[2:].replace("-", "_")
    note = next(line for line in proc.stdout.splitlines() if line.startswith("note:"))
    assert note.startswith(f"note: {tmp_path / 'last.pt'} has no step left to train: it keeps the values it was "
                           "trained with, --"), note
    assert {f"--lr {trained['lr']} (2.0 given)", f"{temperature} {trained[name]} (0.5 given)",
            "--knn-every 0 (1 given)"} == set(note.split("trained with, ")[1].split(", ")), note
    assert "continues with other values" not in proc.stdout and "done at step 8" in proc.stdout
    for saved in (load(tmp_path / "last.pt")["args"], load(tmp_path / "backbone.pt")["args"],
                  json.loads((tmp_path / "args.json").read_text())):
        assert json.loads(json.dumps(saved)) == json.loads(json.dumps(trained))  # DINO's crop scales: tuples


def test_finished_run_with_its_epoch_end_postponed_keeps_its_flags_too(tmp_path):
    """A run stopped during its last epoch's kNN has no step left to train, only that epoch's end: started
    again by another sweep element's script, it was saved as trained with that element's --lr."""
    run_script("simclr.py", *ARGS, "--output-dir", tmp_path)
    ckpt = load(tmp_path / "last.pt")
    torch.save({**ckpt, "epoch_loss": [[16.0], 4]}, tmp_path / "last.pt")  # as saved before the last epoch's end
    proc = run_script("simclr.py", *ARGS, "--lr", "2.0", "--output-dir", tmp_path)
    assert "has no step left to train: it keeps the values it was trained with, --lr 0.4 (2.0 given)" in proc.stdout
    assert "epoch 1 done step 8/8 loss 4.0000" in proc.stdout, proc.stdout  # the postponed row: 16 / 4 steps
    assert load(tmp_path / "last.pt")["args"]["lr"] == load(tmp_path / "backbone.pt")["args"]["lr"] == 0.4


def test_dino_resnet_run_of_before_the_drop_path_rule_resumes_without_a_note(tmp_path):
    """Until 2026-12-07 a DINO ResNet run recorded --drop-path 0.1, which a ResNet ignores (now 0.0): the
    same command after a git pull was told that its drop path changed."""
    flags = [*ARGS, *METHODS["dino.py"], "--output-dir", tmp_path]
    run_script("dino.py", *flags, "--max-steps", "2")
    ckpt = load(tmp_path / "last.pt")
    ckpt["args"]["drop_path"] = 0.1
    torch.save(ckpt, tmp_path / "last.pt")
    proc = run_script("dino.py", *flags, "--max-steps", "4")
    assert "resumed from" in proc.stdout and "drop-path" not in proc.stdout, proc.stdout


def test_resumed_run_keeps_the_image_size_of_its_checkpoint(tmp_path):
    """The default --image-size of an image folder became the median of its images (it was the first
    file's): a run begun before, at the first file's size, resumes at its own, not refused."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8) if i == 0 else (12, 12), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    flags = ["--dataset", "imagefolder", "--data-dir", root, "--device", "cpu", "--workers", "0", "--batch-size", "4",
             "--epochs", "2", "--knn-every", "0", "--output-dir", tmp_path / "run"]
    run_script("simclr.py", *flags, "--image-size", "8", "--max-steps", "2")  # as the first file's size gave it
    proc = run_script("simclr.py", *flags, "--max-steps", "4")
    assert "resumed from" in proc.stdout and "at 8 px" in proc.stdout
    assert load(tmp_path / "run" / "last.pt")["step"] == 4


def test_args_json_that_cannot_be_written_is_one_line(tmp_path):
    """args.json is written as the checkpoints are: a temporary file renamed over it; a failed write
    is one line, and leaves no temporary file."""
    (tmp_path / "args.json").mkdir()  # a folder in its place: the rename fails
    proc = run_script("simclr.py", *ARGS, "--max-steps", "1", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: could not write {tmp_path / 'args.json'} (")
    assert not list(tmp_path.glob("args.json.*.tmp"))


@pytest.mark.parametrize("script,flag,value,message", [
    ("simclr.py", "--epochs", 1, "has trained 6 steps (1.5 epochs): past --epochs 1; give --epochs 2 or more to go "
     "on from it, or another --output-dir"),
    ("simclr.py", "--max-steps", 4, "has trained 6 steps: past --max-steps 4; give --max-steps 6 or more, or leave "
     "it out, or another --output-dir"),
    ("linear_eval.py", "--epochs", 1, "has trained 8 steps (2 epochs): past --epochs 1; give --epochs 2 or more to "
     "go on from it, or another --output-dir")])
def test_a_run_started_again_with_an_end_it_went_past_is_refused(tmp_path, pretrained, script, flag, value, message):
    """A run extended, then its first command again: it would be saved again, and args.json (and a
    probe's results.json) written, as trained with the smaller --epochs or --max-steps. One line;
    nothing is written."""
    args = [*ARGS, "--max-steps", 6] if script == "simclr.py" else [
        "--ckpt", pretrained / "last.pt", "--mode", "fast", "--epochs", 2, "--batch-size", 32, "--device", "cpu",
        "--workers", 0]
    run_script(script, *args, "--output-dir", tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "args.json", "metrics.csv")}
    proc = run_script(script, *args, flag, value, "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'last.pt'} {message}"
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


@pytest.mark.parametrize("mode", ["fast", "linear"])
def test_linear_eval_resume_is_exact(tmp_path, pretrained, mode):
    args = ["--ckpt", pretrained / "last.pt", "--mode", mode, "--epochs", "3", "--batch-size", "32",
            "--device", "cpu", "--workers", "0", "--deterministic", "--knn-every", "0"]
    run_script("linear_eval.py", *args, "--output-dir", tmp_path / "straight")
    run_script("linear_eval.py", *args, "--output-dir", tmp_path / "resumed", "--max-steps", 5)
    run_script("linear_eval.py", *args, "--output-dir", tmp_path / "resumed")
    run_script("linear_eval.py", *args, "--output-dir", tmp_path / "resumed")  # finished: saved again as it was
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "resumed" / "last.pt")
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert (tmp_path / "straight" / "results.json").read_text() != ""


def test_resume_with_another_precision(tmp_path):
    """A checkpoint saved without fp16 holds an empty loss-scaler state (torch refuses to load it
    into an active scaler); resuming with --precision fp16 (or auto on another GPU generation)
    starts a fresh scaler instead, and the way back ignores the saved scale."""
    args = [*TINY, "--batch-size", "8", "--epochs", "1", "--knn-every", "0", "--output-dir", tmp_path]  # fp16: slow
    for step, precision in enumerate(["fp32", "fp16", "bf16"], start=1):
        run_script("simclr.py", *args, "--precision", precision, "--max-steps", step)
        ckpt = load(tmp_path / "last.pt")
        assert ckpt["step"] == step and ckpt["args"]["precision"] == precision
        assert bool(ckpt["scaler"]) == (precision == "fp16")


def test_gpu_random_state_goes_to_each_process_gpu(monkeypatch):
    """With several GPUs per machine, rank r trains on GPU r (drop path draws there). Rank 0 saves
    the state of its own GPU, and every rank restores it onto its own: all ranks were seeded alike
    and draw alike, so that is each one's state. (Restoring every GPU's state from rank 0's process
    would restart rank r's stream from its seed at each resume.) torch.cuda is a stand-in here."""
    import simclr
    gpus, current = {0: torch.tensor([7], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}, [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpus[current[0]].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpus.__setitem__(current[0], state))
    saved = simclr.rng_states()  # rank 0, on GPU 0
    assert [s.tolist() for s in saved["cuda"]] == [[7]]
    current[0], gpus[1] = 1, torch.tensor([0], dtype=torch.uint8)  # rank 1 restarts on GPU 1
    simclr.set_rng_states(saved)
    assert gpus[1].tolist() == [7] and gpus[0].tolist() == [7]
    old = dict(saved, cuda=[torch.tensor([5], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)])
    simclr.set_rng_states(old)  # a checkpoint with every GPU of rank 0's process: GPU 0's is rank 0's
    assert gpus[1].tolist() == [5]


def test_a_cpu_run_on_a_gpu_machine_does_not_start_cuda_to_save(monkeypatch):
    """torch.cuda.get_rng_state starts CUDA (a context of some 500 MB on GPU 0, an error on a busy
    exclusive-mode GPU): a run that never started CUDA saves no GPU random state."""
    import simclr

    def get_rng_state(device="cuda"):
        raise AssertionError("CUDA started by rng_states")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    assert simclr.rng_states()["cuda"] == []
