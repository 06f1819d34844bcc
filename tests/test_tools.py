"""tools/wandb_sync.py (replay a run's CSV into wandb, later, from a login node) and
tools/plot_metrics.py (curves from metrics.csv), tools/benchmark.py and tools/cifar10_figures.sh
(the README's figures). wandb is replaced by a fake module that records
the calls; matplotlib draws for real."""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, clean_env, run_script

sys.path.insert(0, str(REPO / "tools"))  # the tools import as modules: benchmark, plot_metrics

FAKE_WANDB = '''
import json, os
class Run:
    def __init__(self, kw):
        self.calls = {"init": kw, "log": []}
    def log(self, values, step):
        self.calls["log"].append([step, values])
    def finish(self):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps(self.calls) + "\\n")
def init(**kw):
    return Run(kw)
'''


@pytest.fixture
def run_dir(tmp_path, pretrained):
    shutil.copytree(pretrained, tmp_path / "run")
    return tmp_path / "run"


def fake_module(tmp_path, name, source):
    (tmp_path / "fake" / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "fake" / name / "__init__.py").write_text(source)
    return clean_env(PYTHONPATH=str(tmp_path / "fake"), FAKE_WANDB_LOG=str(tmp_path / "wandb.log"))


def test_wandb_sync_replays_the_run_then_only_new_rows(tmp_path, run_dir):
    env = fake_module(tmp_path, "wandb", FAKE_WANDB)
    run_script("tools/wandb_sync.py", run_dir, "--mode", "offline", "--project", "p", env=env)
    first = json.loads((tmp_path / "wandb.log").read_text().splitlines()[0])
    init = first["init"]
    assert re.fullmatch("[0-9a-f]{8}", init["id"]) and init["resume"] == "allow" and init["mode"] == "offline"
    assert init["project"] == "p" and init["name"] == "run"
    assert init["config"] == json.loads((run_dir / "args.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    logged = dict((step, values) for step, values in first["log"])
    assert [s for s, _ in first["log"]] == sorted({int(r["step"]) for r in rows})  # one call per step, in order
    for r in rows:
        values = logged[int(r["step"])]
        if r["kind"] == "step":
            assert values["loss"] == float(r["loss"]) and values["lr"] == float(r["lr"])
        else:
            assert values["epoch/loss"] == float(r["loss"]) and values["epoch/knn_top1"] == float(r["knn_top1"])
    # The job went on (resumed with more epochs): only the new rows are sent, to the same wandb run. The
    # last step row waits: its epoch row, with the kNN accuracy, is written after the kNN, and wandb
    # takes each step once.
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("step,2,10,3.5,0.01,40.0,900,,12.0\nstep,2,12,3.4,0.01,40.0,900,,13.0\n")
    run_script("tools/wandb_sync.py", run_dir, "--mode", "offline", env=env)
    second = json.loads((tmp_path / "wandb.log").read_text().splitlines()[1])
    assert second["init"]["id"] == init["id"] and second["log"] == [[10, {"epoch": 2, "loss": 3.5, "lr": 0.01,
                                                                       "img_per_s": 40.0, "peak_mem_mb": 900.0,
                                                                       "time_s": 12.0}]]
    assert json.loads((run_dir / "wandb_sync.json").read_text()) == {"id": init["id"], "step": 10}
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("epoch,2,12,3.45,0.01,40.0,900,31.5,14.0\n")
    run_script("tools/wandb_sync.py", run_dir, "--mode", "offline", env=env)
    third = json.loads((tmp_path / "wandb.log").read_text().splitlines()[2])
    assert [(s, v.get("loss"), v.get("epoch/knn_top1")) for s, v in third["log"]] == [(12, 3.4, 31.5)]


def test_wandb_sync_sends_a_methods_own_columns(tmp_path):
    """dino.py's metrics.csv ends with teacher_entropy: logged per step and as epoch/teacher_entropy."""
    run = tmp_path / "dino-1"
    run.mkdir()
    (run / "metrics.csv").write_text("kind,epoch,step,loss,lr,img_per_s,peak_mem_mb,knn_top1,time_s,teacher_entropy\n"
                                     "step,0,2,5.1,0.001,7.0,1064,,8.9,4.25\nepoch,0,2,5.0,0.001,7.0,1064,,9.0,4.5\n")
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=fake_module(tmp_path, "wandb", FAKE_WANDB))
    log = json.loads((tmp_path / "wandb.log").read_text())["log"]
    assert log == [[2, {"epoch": 0, "loss": 5.1, "lr": 0.001, "img_per_s": 7.0, "peak_mem_mb": 1064.0, "time_s": 8.9,
                        "teacher_entropy": 4.25, "epoch/loss": 5.0, "epoch/teacher_entropy": 4.5}]]


def test_wandb_sync_clear_errors(tmp_path, run_dir):
    env = fake_module(tmp_path, "wandb", "raise ImportError('No module named wandb')")
    proc = run_script("tools/wandb_sync.py", run_dir, env=env, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: wandb is not installed: pip install wandb " \
                                                            "(only this tool needs it)"
    proc = run_script("tools/wandb_sync.py", tmp_path / "nothing", env=env, check=False)
    assert proc.returncode == 1 and "has no metrics.csv" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("state", ['{"id": "x"}', "[1, 2]", '{"id": "x", "step": "3"}'])
def test_wandb_sync_state_file_of_another_shape_is_one_line(tmp_path, run_dir, state):
    env = fake_module(tmp_path, "wandb", FAKE_WANDB)
    (run_dir / "wandb_sync.json").write_text(state)
    proc = run_script("tools/wandb_sync.py", run_dir, "--mode", "offline", env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith(f"error: {run_dir / 'wandb_sync.json'} does not hold this tool's")


def test_plot_metrics_gives_each_run_one_colour_in_every_panel(tmp_path, monkeypatch):
    """A SimCLR run beside a DINO run: the teacher-entropy panel has only DINO's curve, which must keep
    DINO's colour (the legend's), not take the first colour of its panel, SimCLR's."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import matplotlib.axes
    import plot_metrics
    simclr_csv = "\n".join(",".join(r.split(",")[:9]) for r in DINO_CSV.split("\n")[:-1]) + "\n"
    for name, rows in (("simclr", simclr_csv), ("dino", DINO_CSV)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(rows)
    colours = {}
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **kw: colours.setdefault(
        kw.get("label"), set()).add(plot(self, *a, **kw)[0].get_color()) or [])
    plot_metrics.main([str(tmp_path / "simclr"), str(tmp_path / "dino"), "--out", str(tmp_path / "p.png")])
    assert len(colours["simclr"]) == len(colours["dino"]) == 1 and colours["simclr"] != colours["dino"], colours


def test_plot_metrics_draws_every_panel(tmp_path, run_dir):
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    proc = run_script("tools/plot_metrics.py", run_dir)
    png = run_dir / "metrics.png"
    assert f"wrote {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    run_script("tools/plot_metrics.py", run_dir, run_dir, "--out", tmp_path / "two.png")
    assert (tmp_path / "two.png").exists()


def test_plot_metrics_labels_runs_with_the_same_folder_name_apart(tmp_path, monkeypatch):
    """a/simclr and b/simclr (cifar10_figures.sh's layout) are two curves, labelled a/simclr and b/simclr."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import matplotlib.axes
    import plot_metrics
    for parent, rows in (("a", DINO_CSV), ("b", DINO_CSV.replace("5.1", "6.1"))):
        (tmp_path / parent / "simclr").mkdir(parents=True)
        (tmp_path / parent / "simclr" / "metrics.csv").write_text(rows)
    labels = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: labels.append(kw.get("label")) or plot(self, *a, **kw))
    plot_metrics.main([str(tmp_path / "a" / "simclr"), str(tmp_path / "b" / "simclr"), "--out", str(tmp_path)])
    assert set(labels) == {"a/simclr", "b/simclr"}


def test_plot_metrics_marks_a_run_of_one_logged_step(tmp_path, monkeypatch):
    """A one-epoch run may log a single step row: a line through one point is invisible, a marker is not."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import matplotlib.axes
    import plot_metrics
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text(DINO_CSV.rsplit("step,1,4", 1)[0])  # one step row, one epoch row
    markers = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: markers.append(kw.get("marker")) or plot(self, *a, **kw))
    plot_metrics.main([str(tmp_path / "run"), "--out", str(tmp_path / "p.png")])
    assert markers == ["o"] * 5  # loss, lr, img/s, teacher entropy, kNN


DINO_CSV = ("kind,epoch,step,loss,lr,img_per_s,peak_mem_mb,knn_top1,time_s,teacher_entropy\n"
            "step,0,2,5.1,0.001,7.0,1064,,8.9,4.25\nepoch,0,2,5.0,0.001,7.0,1064,12.5,9.0,4.5\n"
            "step,1,4,4.9,0.001,7.2,1064,,17.0,4.0\n")


def test_plot_metrics_of_a_running_dino_job(tmp_path):
    """A method's own column gets its panel; the half row a job is writing is left out; --out may
    be a folder; a wrong --out or a file that is not a metrics.csv is one line."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    run = tmp_path / "dino-1"
    run.mkdir()
    # The first row has no entropy, as in a run started before the column existed, then resumed.
    (run / "metrics.csv").write_text(DINO_CSV.replace("8.9,4.25", "8.9,") + "step,1,6,4.")
    proc = run_script("tools/plot_metrics.py", run, "--out", tmp_path)
    assert proc.stdout.strip() == (f"wrote {tmp_path / 'metrics.png'}: loss, learning rate, images / s, "
                                   "teacher entropy, kNN top-1")
    for out, message in [(tmp_path / "no" / "x.png", "does not exist"), (tmp_path / "x.foo", "cannot write .foo")]:
        proc = run_script("tools/plot_metrics.py", run, "--out", out, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    (run / "metrics.csv").write_text("a,b\n1,2\n")
    proc = run_script("tools/plot_metrics.py", run, check=False)
    assert proc.returncode == 1 and "not a metrics.csv of these scripts" in proc.stderr


def test_wandb_sync_leaves_a_half_written_row_for_later(tmp_path):
    run = tmp_path / "dino-1"
    run.mkdir()
    (run / "metrics.csv").write_text(DINO_CSV + "step,1,6,4.")
    env = fake_module(tmp_path, "wandb", FAKE_WANDB)
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=env)
    assert [step for step, _ in json.loads((tmp_path / "wandb.log").read_text())["log"]] == [2]  # 4: see above
    assert json.loads((run / "wandb_sync.json").read_text())["step"] == 2
    (run / "args.json").write_text('{"lr": 0.3,')
    proc = run_script("tools/wandb_sync.py", run, "--mode", "offline", env=env, check=False)
    assert proc.returncode == 1 and "args.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_plot_metrics_without_matplotlib(tmp_path, run_dir):
    env = fake_module(tmp_path, "matplotlib", "raise ImportError('No module named matplotlib')")
    proc = run_script("tools/plot_metrics.py", run_dir, env=env, check=False)
    assert proc.returncode == 1 and "matplotlib is not installed: pip install matplotlib" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "metrics.png").exists()


def test_benchmark_writes_every_figure(tmp_path):
    """tools/benchmark.py at a tiny size: the issue's JSON keys, positive figures, ratios that are
    the quotients of the figures they name; --aug-only measures the augmentation alone."""
    out = tmp_path / "bench.json"
    tiny = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--steps", "1", "--warmup", "1",
            "--aug-steps", "2", "--workers", "1", "--device", "cpu"]
    proc = run_script("tools/benchmark.py", "--method", "simclr", *tiny, "--json", out)
    r = json.loads(out.read_text())
    keys = ["model_only_img_s", "end_to_end_cpu_loader_img_s", "end_to_end_device_aug_img_s", "aug_pil_img_s",
            "aug_batched_img_s", "peak_mem_bytes"]
    assert all(r[k] > 0 for k in keys), r
    assert r["end_to_end_device_aug_ratio"] == pytest.approx(r["end_to_end_device_aug_img_s"] / r["model_only_img_s"])
    assert r["aug_batched_over_pil"] == pytest.approx(r["aug_batched_img_s"] / r["aug_pil_img_s"])
    assert (r["method"], r["arch"], r["image_size"], r["batch_size"]) == ("simclr", "resnet18", 16, 8)
    assert "simclr" in proc.stdout and "model only" in proc.stdout
    header = proc.stdout.splitlines()[0]  # the settings used: --aug-only's has no model steps
    assert "resnet18, 1 timed steps; 2 timed batches of each augmentation in 3 turns" in header, header
    proc = run_script("tools/benchmark.py", "--method", "dino", "--aug-only", *tiny, "--json", out, "--",
                      "--local-crops", "2")
    r = json.loads(out.read_text())
    assert r["aug_pil_img_s"] > 0 and r["aug_batched_img_s"] > 0 and "model_only_img_s" not in r
    header = proc.stdout.splitlines()[0]
    assert "2 timed batches of each augmentation" in header and "steps" not in header, header
    proc = run_script("tools/benchmark.py", "--aug-rounds", "0", check=False)
    assert proc.returncode == 2 and "--aug-rounds must be at least 1" in proc.stderr
    for bad, message in ((["--images", "16"], "--images 16 is too few"),
                         (["--", "--batch-size", "4"], "--batch-size after --: give it to the benchmark itself"),
                         (["--", "--synthetic-size", "20", "10"],  # the loaders ran out of images: StopIteration
                          "--synthetic-size after --: give --images N to the benchmark itself"),
                         (["--json", tmp_path], "cannot write a file there (a folder)"),
                         (["--warmup", "-3"], "argument --warmup: must be at least 0")):
        proc = run_script("tools/benchmark.py", *tiny, *bad, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_benchmark_times_the_pil_loader_after_what_it_made_ahead():
    """Each of the --workers loader processes has 2 batches made ahead, and they finish theirs in
    bursts of --workers: 16 workers timed over 10 batches once measured 350 times the true rate of a
    slowed-down pipeline. The made-ahead batches are skipped and at least 4 bursts are timed."""
    import benchmark
    opts = argparse.Namespace(warmup=2, steps=10, aug_steps=30, aug_rounds=3, workers=16)
    assert benchmark.pil_counts(opts) == (2 + 32, 64)
    opts.workers = 2
    assert benchmark.pil_counts(opts) == (2 + 4, 10)
    if not torch.cuda.is_available():
        proc = run_script("tools/benchmark.py", "--device", "cuda", check=False)
        assert proc.returncode == 2 and "no GPU is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_makes_the_images_once_and_times_longer_on_a_gpu(monkeypatch, capsys):
    """--method all measures every method on the same synthetic images, made once (25,000 of them
    took 15 s each time); without --steps, --warmup and --aug-steps a GPU gets 50, 10 and 300."""
    import benchmark
    made = []
    load_data = benchmark.common.load_data
    monkeypatch.setattr(benchmark.common, "load_data", lambda args: made.append(1) or load_data(args))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--method", "all", "--aug-only", "--image-size", "16",
                                      "--batch-size", "8", "--aug-steps", "1", "--aug-rounds", "1", "--workers", "0",
                                      "--device", "cpu"])
    benchmark.main()
    out = capsys.readouterr().out
    assert len(made) == 1 and all(m in out for m in ("simclr", "byol", "barlow", "dino")), out
    seen = {}
    monkeypatch.setattr(benchmark, "bench", lambda method, opts: seen.update(vars(opts)) or {})
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cuda", "--aug-only", "--workers", "2"])
    with pytest.raises(KeyError):  # the fake bench returns no figures to print
        benchmark.main()
    assert (seen["steps"], seen["warmup"], seen["aug_steps"]) == (50, 10, 300)


def test_cifar10_figures_script_end_to_end(tmp_path):
    """tools/cifar10_figures.sh on a tiny archive of the CIFAR-10 layout, on the CPU: packs it,
    benchmarks every method's augmentation, trains SimCLR and prints one row per epoch."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 8)):
        for c in ("cat", "dog"):
            (tmp_path / "cifar10" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "cifar10" / split / c / f"{i:04d}.jpg")
    with tarfile.open(tmp_path / "c10.tar.xz", "w:xz") as t:
        t.add(tmp_path / "cifar10", arcname="cifar10")
    env = clean_env(DEVICE="cpu", BENCH_FLAGS="--aug-only --batch-size 16 --aug-steps 1 --aug-rounds 1 --warmup 1",
                    SIMCLR_FLAGS="--batch-size 32 --workers 0")
    cmd = ["bash", REPO / "tools" / "cifar10_figures.sh", tmp_path / "c10.tar.xz", tmp_path / "out", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert set(figures) >= {"simclr", "byol", "barlow", "dino"} and figures["simclr"]["aug_batched_img_s"] > 0
    table = proc.stdout[proc.stdout.index("epoch  seconds"):].splitlines()[1:]
    assert [row.split()[0] for row in table] == ["1", "2"]
    assert all(0 <= float(row.split()[-1]) <= 100 for row in table)
    assert "train: 64 images of 32 px" in proc.stdout
    proc = subprocess.run(["bash", REPO / "tools" / "cifar10_figures.sh", tmp_path / "nothing.tar.xz", tmp_path],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: archive") and "not a file" in proc.stderr
    proc = subprocess.run(["bash", REPO / "tools" / "cifar10_figures.sh", tmp_path / "c10.tar.xz"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")


@pytest.mark.parametrize("spans", ["equal", "growing"])
def test_benchmark_figures_are_images_over_timed_seconds_and_ratios_of_the_named_figures(monkeypatch, spans):
    """A fake clock: every timed span lasts 1 s ("equal"), so each figure is the images it timed; or
    each span is longer than the last ("growing"), so a ratio over the wrong figure shows."""
    import benchmark
    ticks, now = iter(range(1, 10**6)), [0.0]

    def clock():
        now[0] += 1.0 if spans == "equal" else next(ticks)
        return now[0]

    monkeypatch.setattr(benchmark, "time", argparse.Namespace(perf_counter=clock))
    opts = argparse.Namespace(image_size=16, batch_size=8, arch="resnet18", device="cpu", workers=1, precision="fp32",
                              extra=[], data=None, aug_only=False, steps=2, warmup=1, aug_steps=2, aug_rounds=2)
    skip, n = benchmark.pil_counts(opts)  # 3 batches skipped, 4 timed with the PIL loader
    opts.images = 8 * (skip + n + 2)
    r = benchmark.bench("simclr", opts)
    if spans == "equal":
        assert r["model_only_img_s"] == r["end_to_end_device_aug_img_s"] == 8 * 2
        assert r["end_to_end_cpu_loader_img_s"] == r["aug_pil_img_s"] == 8 * n
        assert r["aug_batched_img_s"] == 8 * 1  # aug_steps / aug_rounds batches per round
    for ratio, num, den in (("end_to_end_cpu_loader_ratio", "end_to_end_cpu_loader_img_s", "model_only_img_s"),
                            ("end_to_end_device_aug_ratio", "end_to_end_device_aug_img_s", "model_only_img_s"),
                            ("aug_batched_over_pil", "aug_batched_img_s", "aug_pil_img_s")):
        assert r[ratio] == pytest.approx(r[num] / r[den])
    if spans == "growing":
        assert r["model_only_img_s"] != r["end_to_end_device_aug_img_s"]  # the check can tell them apart


def test_plot_metrics_puts_each_knn_after_the_epoch_it_ends(tmp_path):
    """metrics.csv counts epochs from 0; the kNN of epoch 0 is measured after 1 epoch of training.
    plot_metrics reads it as x = 1 (epochs trained), and keeps the steps' rows and extra columns."""
    import plot_metrics
    rows = ["kind,epoch,step,loss,lr,img_per_s,peak_mem_mb,knn_top1,time_s,teacher_entropy",
            "step,0,2,5.0,0.1,10,100,,1.0,7.0", "epoch,0,2,5.0,0.1,10,100,20.5,1.5,7.0",
            "step,1,4,4.0,0.1,10,100,,2.0,6.0", "epoch,1,4,4.0,0.1,10,100,30.0,2.5,6.0", "step,2,5,3.0,0.1"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows))  # the last row half-written: a job still running
    steps, knn, extra = plot_metrics.read(tmp_path)
    assert knn == [(1, 20.5), (2, 30.0)] and [r["step"] for r in steps] == ["2", "4"] and extra == ["teacher_entropy"]


def tiny_bench_opts(**kw):
    """bench()'s options at a tiny size, with enough synthetic images for its measurements."""
    import benchmark
    opts = argparse.Namespace(image_size=16, batch_size=8, arch="resnet18", device="cpu", workers=0, precision="fp32",
                              extra=[], data=None, aug_only=True, steps=1, warmup=1, aug_steps=1, aug_rounds=1)
    vars(opts).update(kw)
    skip, n = benchmark.pil_counts(opts)
    opts.images = 8 * (skip + max(n, opts.steps + opts.warmup, -(-opts.aug_steps // opts.aug_rounds) + opts.warmup) + 1)
    return benchmark, opts


def test_benchmark_peak_memory_on_a_cpu_is_in_bytes():
    """On a CPU peak_mem_bytes is the process's peak resident memory, in bytes (getrusage gives KiB on
    Linux): at least what this process, torch loaded, holds before the benchmark starts."""
    benchmark, opts = tiny_bench_opts()
    with open("/proc/self/statm") as f:  # Linux, as getrusage's KiB
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    r = benchmark.bench("simclr", opts)
    assert resident <= r["peak_mem_bytes"] < 2**40, (resident, r["peak_mem_bytes"])


def test_benchmark_prints_every_figure_with_its_ratio_and_writes_the_settings(tmp_path, monkeypatch, capsys):
    """The printed line: each end-to-end figure with its ratio to the model-only one, the two
    augmentation figures with theirs, the peak memory in MiB; --json also holds the settings."""
    import benchmark
    figures = {"model_only_img_s": 200.0, "end_to_end_cpu_loader_img_s": 50.0, "end_to_end_device_aug_img_s": 150.0,
               "end_to_end_cpu_loader_ratio": 0.25, "end_to_end_device_aug_ratio": 0.75, "aug_pil_img_s": 40.0,
               "aug_batched_img_s": 120.0, "aug_batched_over_pil": 3.0, "peak_mem_bytes": 5 * 2**20}
    monkeypatch.setattr(benchmark, "bench", lambda method, opts: dict(figures))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--method", "byol", "--device", "cpu", "--workers", "3",
                                      "--image-size", "16", "--batch-size", "8", "--json", str(tmp_path / "b.json")])
    benchmark.main()
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split() == ["byol", "model", "only", "200.0", "img/s", "|", "end", "to", "end:", "PIL", "loader",
                            "50.0", "(0.25),", "device", "aug", "150.0", "(0.75)", "|", "augmentation", "alone:",
                            "PIL", "40.0,", "batched", "120.0", "(x3.0)", "|", "peak", "memory", "5", "MiB"], line
    written = json.loads((tmp_path / "b.json").read_text())
    assert written == {"device": f"CPU, {len(os.sched_getaffinity(0))} cores", "arch": "resnet18", "image_size": 16,
                       "batch_size": 8, "torch": torch.__version__, "workers": 3, "method": "byol", **figures}


def test_benchmark_defaults_on_a_cpu(monkeypatch):
    """Without --steps, --warmup, --aug-steps and --workers a CPU gets 10, 2, 30 and one loader
    process per core it may use; --steps 0 is refused like --aug-steps 0."""
    import benchmark
    seen = {}
    monkeypatch.setattr(benchmark, "bench", lambda method, opts: seen.update(vars(opts)) or {})
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cpu", "--aug-only"])
    with pytest.raises(KeyError):  # the fake bench returns no figures to print
        benchmark.main()
    assert (seen["steps"], seen["warmup"], seen["aug_steps"]) == (10, 2, 30)
    assert seen["workers"] == len(os.sched_getaffinity(0))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cpu", "--steps", "0"])
    with pytest.raises(SystemExit) as e:
        benchmark.main()
    assert e.value.code == 2


def test_benchmark_waits_for_the_gpu_before_reading_the_clock(monkeypatch):
    """CUDA runs asynchronously: a timed span starts and ends with a synchronize, or it measures only
    the time to queue the work."""
    import benchmark
    events = []
    monkeypatch.setattr(benchmark.torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(benchmark, "time", argparse.Namespace(perf_counter=lambda: events.append("clock") or
                                                              float(len(events))))
    rate = benchmark.timed(lambda: events.append("work"), 30, torch.device("cuda"))
    assert events == ["sync", "clock", "work", "sync", "clock"] and rate == 30 / 3


def test_benchmark_accepts_the_images_its_error_asks_for(monkeypatch, capsys):
    """--images too few names the least it takes ("give at least N"): N itself is accepted."""
    import benchmark
    monkeypatch.setattr(benchmark, "bench", lambda method, opts: {})
    argv = ["benchmark.py", "--device", "cpu", "--aug-only", "--batch-size", "8", "--workers", "2", "--warmup", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--images", "8"])
    with pytest.raises(SystemExit):
        benchmark.main()
    least = int(capsys.readouterr().err.split("give at least ")[1].split(",")[0])
    monkeypatch.setattr(sys, "argv", [*argv, "--images", str(least)])
    with pytest.raises(KeyError):  # past the checks: the fake bench returns no figures to print
        benchmark.main()


def test_benchmark_draws_each_warmup_once_then_the_timed_batches(monkeypatch):
    """Each measurement draws from a fresh loader its untimed batches (the PIL loader's: the warm-up
    and what its workers made ahead), then the ones it times, and no more: --images is sized for that.
    Each model measurement trains its warm-up steps untimed first (the model-only one too)."""
    benchmark, opts = tiny_bench_opts(aug_only=False, workers=1, warmup=2, steps=1, aug_steps=3, aug_rounds=2)
    drawn = []
    make = benchmark.common.pretrain_loader

    class Counted:
        def __init__(self, *a):
            self.loader = make(*a)
            self.sampler = self.loader.sampler
            drawn.append(0)

        def __iter__(self):
            for batch in self.loader:
                drawn[-1] += 1
                yield batch

    trained, setup = [], benchmark.setup

    def counted(batches):
        trained.append(0)
        for batch in batches:
            trained[-1] += 1
            yield batch

    def setup_counted(method, opts):
        *pieces, train = setup(method, opts)
        return (*pieces, lambda batches: train(counted(batches)))

    monkeypatch.setattr(benchmark.common, "pretrain_loader", Counted)
    monkeypatch.setattr(benchmark, "setup", setup_counted)
    benchmark.bench("simclr", opts)
    skip, n = benchmark.pil_counts(opts)
    assert (skip, n) == (2 + 2, 4)
    # model only (one batch), end to end (PIL, device), then the augmentation alone, PIL and batched, twice
    assert drawn == [1, skip + n, 2 + 1, skip + n, 2 + 2, skip + n, 2 + 2]
    assert trained == [2, 1, 2, n, 2, 1]  # the warm-up, then the timed steps: model only, PIL loader, device aug


def test_wandb_sync_sends_the_last_step_of_a_finished_run(tmp_path):
    """A run that --max-steps ends mid-epoch has a step row last; once backbone.pt is written (here
    within the same timestamp as metrics.csv, as on a file system with coarse times) nothing more
    comes, so that step is sent too rather than held back for a sync that never brings its epoch row."""
    run = tmp_path / "simclr-1"
    run.mkdir()
    (run / "metrics.csv").write_text(DINO_CSV)
    (run / "backbone.pt").write_bytes(b"weights")
    mtime = (run / "metrics.csv").stat().st_mtime_ns
    os.utime(run / "backbone.pt", ns=(mtime, mtime))
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=fake_module(tmp_path, "wandb", FAKE_WANDB))
    sent = json.loads((tmp_path / "wandb.log").read_text())
    assert [step for step, _ in sent["log"]] == [2, 4]
    assert json.loads((run / "wandb_sync.json").read_text()) == {"id": sent["init"]["id"], "step": 4}


def test_wandb_sync_keeps_the_run_id_when_a_sync_sends_nothing(tmp_path):
    """A first sync while the run has logged one step sends nothing (that step waits for its epoch
    row) but keeps the wandb run it opened: the next sync adds to that run, not to a new one."""
    run = tmp_path / "dino-1"
    run.mkdir()
    (run / "metrics.csv").write_text(DINO_CSV.split("epoch,0")[0])
    env = fake_module(tmp_path, "wandb", FAKE_WANDB)
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=env)
    (run / "metrics.csv").write_text(DINO_CSV)
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=env)
    first, second = (json.loads(line) for line in (tmp_path / "wandb.log").read_text().splitlines())
    assert first["log"] == [] and [step for step, _ in second["log"]] == [2]
    assert second["init"]["id"] == first["init"]["id"] == json.loads((run / "wandb_sync.json").read_text())["id"]


def test_wandb_sync_passes_the_name_and_entity_given(tmp_path):
    run = tmp_path / "dino-1"
    run.mkdir()
    (run / "metrics.csv").write_text(DINO_CSV)
    run_script("tools/wandb_sync.py", run, "--mode", "offline", "--entity", "team", "--name", "dino-c10",
               env=fake_module(tmp_path, "wandb", FAKE_WANDB))
    init = json.loads((tmp_path / "wandb.log").read_text())["init"]
    assert (init["entity"], init["name"], init["project"]) == ("team", "dino-c10", "ssl-single-file")


def test_tools_warn_of_rows_of_two_runs_and_name_a_probe_by_its_run(tmp_path, capsys):
    """Two runs started in one folder (a sweep given one OUTPUT_DIR) both log rows until one stops at
    its next save: metrics.csv holds two rows for a step, which both tools used without a word. A
    probe's folder (every probe's default is linear_eval or linear_eval_fast) is named with its run's."""
    import plot_metrics
    run = tmp_path / "simclr-7" / "linear_eval_fast"
    run.mkdir(parents=True)
    lines = DINO_CSV.splitlines()
    (run / "metrics.csv").write_text("\n".join([*lines, lines[1]]) + "\n")  # step 2 again, from the other run
    plot_metrics.read(run)
    assert "holds 1 steps logged twice: two runs wrote to this folder at once" in capsys.readouterr().err
    proc = run_script("tools/wandb_sync.py", run, "--mode", "offline", env=fake_module(tmp_path, "wandb", FAKE_WANDB))
    assert "holds two rows for step 2 (1 such rows): two runs wrote to this folder at once" in proc.stderr
    assert json.loads((tmp_path / "wandb.log").read_text())["init"]["name"] == "simclr-7/linear_eval_fast"
    (run / "metrics.csv").write_text(DINO_CSV)
    plot_metrics.read(run)
    assert capsys.readouterr().err == ""


def test_wandb_sync_leaves_an_epoch_row_cut_in_its_last_column(tmp_path):
    """A row cut short inside its last column has every field; sent, epoch/teacher_entropy would be 4.0
    instead of the 4.5 that the job is writing, and wandb takes each step once: it waits for its newline."""
    run = tmp_path / "dino-1"
    run.mkdir()
    (run / "metrics.csv").write_text(DINO_CSV.split("\nstep,1")[0][:-1])  # ...,9.0,4.5 cut to ...,9.0,4.
    run_script("tools/wandb_sync.py", run, "--mode", "offline", env=fake_module(tmp_path, "wandb", FAKE_WANDB))
    assert json.loads((tmp_path / "wandb.log").read_text())["log"] == []
    assert json.loads((run / "wandb_sync.json").read_text())["step"] == 0


@pytest.mark.parametrize("text, message", [("a,b\n1,2\n", "is not a metrics.csv of these scripts"),
                                           (DINO_CSV.split("\n")[0] + "\n", "has no rows yet")])
def test_wandb_sync_refuses_another_csv_and_a_run_without_rows(tmp_path, text, message):
    """Another CSV, or a run that has logged nothing yet: one line, and no wandb run opened."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(text)
    proc = run_script("tools/wandb_sync.py", run, "--mode", "offline", env=fake_module(tmp_path, "wandb", FAKE_WANDB),
                      check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "wandb.log").exists() and not (run / "wandb_sync.json").exists()


def test_plot_metrics_panels_titles_axes_and_legend(tmp_path, monkeypatch):
    """Two runs, no --out: the image goes to the first run's folder. Loss, learning rate, images/s
    and the method's own metric against the step, kNN top-1 against the epochs trained, each a visible
    panel, the spare one blank; the legend names the runs; a value an older row lacks is a gap, not 0."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import matplotlib.figure
    import plot_metrics
    simclr_csv = "\n".join(",".join(r.split(",")[:9]) for r in DINO_CSV.split("\n")[:-1]) + "\n"
    for name, rows in (("simclr", simclr_csv), ("dino", DINO_CSV.replace("8.9,4.25", "8.9,"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(rows)
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **kw: figures.append(self) or
                        savefig(self, *a, **kw))
    plot_metrics.main([str(tmp_path / "simclr"), str(tmp_path / "dino")])
    assert (tmp_path / "simclr" / "metrics.png").exists() and not (tmp_path / "dino" / "metrics.png").exists()
    axes = figures[0].axes
    shown = [(ax.get_title(), ax.get_xlabel()) for ax in axes if ax.axison]
    assert shown == [("loss", "step"), ("learning rate", "step"), ("images / s", "step"),
                     ("teacher entropy", "step"), ("kNN top-1 (%)", "epochs trained")] and len(axes) == 6
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["simclr", "dino"]
    (entropy,) = axes[3].get_lines()
    assert np.isnan(entropy.get_ydata()[0]) and list(entropy.get_ydata()[1:]) == [4.0]
    assert [list(line.get_xdata()) for line in axes[4].get_lines()] == [[1], [1]]


def test_plot_metrics_reads_whole_rows_and_only_the_epochs_with_a_knn(tmp_path):
    """--knn-every 2 leaves the kNN of some epoch rows empty: no point for them; a last line cut inside
    its last column has every field, but is not whole yet: left out."""
    import plot_metrics
    rows = ["kind,epoch,step,loss,lr,img_per_s,peak_mem_mb,knn_top1,time_s,teacher_entropy",
            "step,0,2,5.0,0.1,10,100,,1.0,7.0", "epoch,0,2,5.0,0.1,10,100,,1.5,7.0",
            "step,1,4,4.0,0.1,10,100,,2.0,6.0", "epoch,1,4,4.0,0.1,10,100,30.0,2.5,6.0",
            "step,2,6,3.0,0.1,10,100,,3.0,5"]  # the job is writing 5.5
    (tmp_path / "metrics.csv").write_text("\n".join(rows))
    steps, knn, _ = plot_metrics.read(tmp_path)
    assert knn == [(2, 30.0)] and [r["step"] for r in steps] == ["2", "4"]


@pytest.mark.filterwarnings("ignore:No artists with labels")  # matplotlib's, of the legend of no curves
def test_plot_metrics_of_a_job_that_has_logged_nothing_yet(tmp_path):
    """A job just started: metrics.csv holds its header only; the plot has empty panels, no error."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import plot_metrics
    (tmp_path / "metrics.csv").write_text(DINO_CSV.split("\n")[0] + "\n")
    plot_metrics.main([str(tmp_path)])
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_benchmark_refuses_after_dashes_every_flag_it_sets_itself(monkeypatch, capsys):
    """After --, a flag the benchmark gives the method script itself would silently win over the
    benchmark's own (--workers: the PIL loader's made-ahead batches would be miscounted): refused."""
    import benchmark
    monkeypatch.setattr(benchmark, "bench", lambda method, opts: pytest.fail(f"measured despite {opts.extra}"))
    for flag in ("--arch", "--image-size", "--batch-size", "--device", "--precision", "--workers", "--aug-device",
                 "--dataset", "--synthetic-size"):
        monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cpu", "--", f"{flag}=1"])
        with pytest.raises(SystemExit):
            benchmark.main()
        assert f"{flag} after --: give" in capsys.readouterr().err


def test_plot_metrics_labels_a_run_given_twice_by_its_folder_name(tmp_path, monkeypatch):
    """The same folder twice is one run: labelled by its name, not by its whole path."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install matplotlib")
    import matplotlib.axes
    import plot_metrics
    (tmp_path / "dino-1").mkdir()
    (tmp_path / "dino-1" / "metrics.csv").write_text(DINO_CSV)
    labels = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: labels.append(kw.get("label")) or plot(self, *a, **kw))
    plot_metrics.main([str(tmp_path / "dino-1"), str(tmp_path / "dino-1" / "."), "--out", str(tmp_path / "p.png")])
    assert set(labels) == {"dino-1"}
