"""A tiny SimCLR run and the linear evaluation of its checkpoints, as a user runs them."""
import argparse
import csv
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import METHODS, REPO, TINY, clean_env, load, main_in_this_process, run_script

CORE_FLAGS = ["--dataset", "--data-dir", "--output-dir", "--arch", "--epochs", "--batch-size", "--lr",
              "--weight-decay", "--optimizer", "--warmup-epochs", "--workers", "--precision", "--device", "--seed",
              "--save-every", "--log-every", "--knn-every", "--max-steps", "--resume", "--deterministic"]


def test_simclr_writes_the_documented_files(pretrained):
    assert sorted(p.name for p in pretrained.iterdir()) == ["args.json", "backbone.pt", "last.pt", "metrics.csv"]
    ckpt = load(pretrained / "last.pt")
    assert ckpt["method"] == "simclr" and ckpt["step"] == 8 and isinstance(ckpt["args"], dict)
    assert set(ckpt) >= {"model", "optimizer", "scaler", "rng", "epoch", "step", "args", "backbone", "backbone_meta"}
    assert ckpt["backbone_meta"] == {"arch": "resnet18", "image_size": 8, "cifar_stem": True, "feat_dim": 512}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    backbone = load(pretrained / "backbone.pt")
    assert set(backbone) == {"method", "args", "backbone", "backbone_meta"}
    assert backbone["backbone"].keys() == ckpt["backbone"].keys()
    rows = list(csv.DictReader(open(pretrained / "metrics.csv")))
    assert list(rows[0]) == ["kind", "epoch", "step", "loss", "lr", "img_per_s", "peak_mem_mb", "knn_top1", "time_s"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= float(r["knn_top1"]) <= 100 for r in epochs)
    assert all(float(r["img_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    assert json.loads((pretrained / "args.json").read_text())["epochs"] == 2


def test_the_row_of_an_epochs_last_steps_is_timed_before_the_knn(tmp_path):
    """time_s of a step row is when its last step ended: the kNN after it (here made 3 s slower,
    minutes on a real dataset) counts in the epoch row's time only, not in the steps' row. The four
    method scripts share these lines."""
    wrapper = tmp_path / "slow_knn.py"  # topk is the kNN's, not the training's: it sleeps 3 s once
    wrapper.write_text(
        "import runpy, sys, time, torch\n"
        "topk, slept = torch.Tensor.topk, []\n"
        "def slow_topk(*a, **k):\n"
        "    if not slept:\n"
        "        slept.append(time.sleep(3))\n"
        "    return topk(*a, **k)\n"
        "torch.Tensor.topk = slow_topk\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    out = tmp_path / "run"
    run_script(wrapper, *TINY, "--epochs", "1", "--log-every", "3", "--knn-every", "1", "--output-dir", out)
    rows = [(r["kind"], int(r["step"]), float(r["time_s"])) for r in csv.DictReader(open(out / "metrics.csv"))]
    assert [row[:2] for row in rows] == [("step", 3), ("step", 4), ("epoch", 4)]
    assert rows[2][2] - rows[1][2] >= 3 > rows[1][2] - rows[0][2]


@pytest.mark.parametrize("ckpt,mode", [("last.pt", "fast"), ("backbone.pt", "linear")])
def test_linear_eval_on_simclr_checkpoints(pretrained, tmp_path, ckpt, mode):
    proc = run_script("linear_eval.py", "--ckpt", pretrained / ckpt, "--mode", mode, "--epochs", "2",
                      "--batch-size", "32", "--device", "cpu", "--workers", "0", "--output-dir", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "synthetic" and results["mode"] == mode  # taken from the checkpoint
    assert 0 <= results["top1"] <= results["top5"] <= 100 and 0 <= results["knn_top1"] <= 100
    assert f"linear top-1 {results['top1']:.2f}%" in proc.stdout


def test_linear_eval_default_output_dir_and_random_baseline(pretrained, tmp_path):
    proc = run_script("linear_eval.py", "--ckpt", pretrained / "last.pt", "--mode", "fast", "--epochs", "1",
                      "--batch-size", "32", "--device", "cpu", "--workers", "0", "--synthetic-size", "96", "48")
    assert "on synthetic: 96 train / 48 test images" in proc.stdout  # the pretraining's dataset, a flag given wins
    fast = pretrained / "linear_eval_fast" / "results.json"  # its own folder: a linear probe then starts anew
    assert json.loads(fast.read_text())["ckpt"] == str(pretrained / "last.pt")
    fast.unlink()
    run_script("linear_eval.py", "--ckpt", pretrained / "last.pt", "--epochs", "1", "--max-steps", "1",
               "--batch-size", "32", "--device", "cpu", "--workers", "0", "--synthetic-size", "96", "48")
    assert json.loads((pretrained / "linear_eval" / "results.json").read_text())["mode"] == "linear"
    # Random baselines: one folder per dataset, arch and mode, under runs/ (here in tmp_path).
    for dataset in ("synthetic", "npz"):
        if dataset == "npz":
            import common
            images, labels = common.synthetic_images(96, 16)
            common.np.savez(tmp_path / "d.npz", train_images=images[:64], train_labels=labels[:64],
                            test_images=images[64:], test_labels=labels[64:])
        run_script(REPO / "linear_eval.py", "--ckpt", "random", "--dataset", dataset, "--synthetic-size", "128", "64",
                   "--data-dir", tmp_path / "d.npz", "--image-size", "16", "--mode", "fast", "--epochs", "1",
                   "--batch-size", "32", "--device", "cpu", "--workers", "0", cwd=tmp_path)
        results = tmp_path / "runs" / f"linear_eval_random_{dataset}_resnet18_fast" / "results.json"
        assert json.loads(results.read_text())["ckpt"] == "random"


@pytest.mark.parametrize("mode,calls", [("fast", 2), ("linear", 2)])
def test_linear_eval_extracts_features_in_batches_of_batch_size(tmp_path, monkeypatch, mode, calls):
    """The frozen backbone sees --batch-size images at a time when it extracts features (fast mode's
    training set, the test set, the kNN's training set), so lowering --batch-size, as the out-of-memory
    line says, is the cure there too (it was always 256). It runs under --precision's autocast, as in
    the linear mode's steps: the probe was scored on fp32 features after training on bf16 ones, and
    fast mode ignored --precision. Run in this process, to count the calls."""
    import linear_eval
    sizes, dtypes, original = [], [], linear_eval.extract_features

    def recording(backbone, dataset, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        dtypes.append((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)  # bf16 under the CPU's bf16 autocast
        return original(backbone, dataset, batch_size, *args, **kwargs)

    monkeypatch.setattr(linear_eval, "extract_features", recording)
    argv = [*TINY, "--ckpt", "random", "--mode", mode, "--epochs", "1", "--batch-size", "16", "--max-steps", "2",
            "--precision", "bf16", "--output-dir", tmp_path]
    main_in_this_process(linear_eval, argv, monkeypatch)
    assert sizes == [16] * calls and (tmp_path / "results.json").exists()
    assert dtypes == [torch.bfloat16] * calls
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["precision"] == "bf16" and "scaler" not in ckpt


def test_linear_eval_keeps_the_pretraining_data_dir_when_given_its_dataset(tmp_path):
    """--dataset npz alone (the pretraining's): its --data-dir is the checkpoint's, not ./data."""
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 255, (64, 16, 16, 3), np.uint8),
             train_labels=np.arange(64) % 4, test_images=rng.integers(0, 255, (32, 16, 16, 3), np.uint8),
             test_labels=np.arange(32) % 4)
    npz = ["--dataset", "npz", "--data-dir", tmp_path / "d.npz"]
    run_script("simclr.py", *TINY, *npz, "--max-steps", "1", "--knn-every", "0", "--output-dir", tmp_path / "run")
    proc = run_script(REPO / "linear_eval.py", "--ckpt", tmp_path / "run" / "backbone.pt", "--dataset", "npz", "--mode",
                      "fast", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--workers", "0",
                      cwd=tmp_path)  # no ./data here
    assert "on npz: 64 train / 32 test images" in proc.stdout


@pytest.mark.parametrize("script", ["simclr.py", "dino.py"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths(tmp_path, precision, script):
    # fp16 and bf16 autocast are slow on CPUs (some 15 s per step of batch 32 here): one step of
    # batch 8 is enough to go through GradScaler (DINO: a ViT with 4 px patches, gradient clipping
    # after unscaling).
    extra = ["--arch", "vit_tiny", "--out-dim", "64", "--head-hidden-dim", "64"] if script == "dino.py" else []
    run_script(script, *TINY, *extra, "--batch-size", "8", "--epochs", "1", "--max-steps", "1",
               "--precision", precision, "--output-dir", tmp_path, "--knn-every", "0")
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["args"]["precision"] == precision and ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_linear_eval_in_fp16_trains_its_head_in_fp32(pretrained, tmp_path):
    """--precision fp16 (auto on V100/T4) applies to the frozen backbone only: the head trains in
    fp32, so no loss scaling (and none of the scaler's read-backs): the probe's checkpoint has no scaler."""
    run_script("linear_eval.py", "--ckpt", pretrained / "last.pt", "--epochs", "1", "--max-steps", "1",
               "--batch-size", "32", "--device", "cpu", "--workers", "0", "--precision", "fp16", "--knn-every", "0",
               "--output-dir", tmp_path)
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["args"]["precision"] == "fp16" and "scaler" not in ckpt
    assert ckpt["head"]["1.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 1


def test_precision_auto_by_gpu_generation(monkeypatch):
    """--precision auto: bf16 from Ampere (compute capability 8) on, fp16 with loss scaling on
    Volta and Turing (7.x: V100, T4), fp32 on older GPUs and on the CPU; a precision given is kept."""
    import argparse
    from simclr import autocast_dtype
    cuda = torch.device("cuda", 0)
    for capability, name, dtype in [((9, 0), "bf16", torch.bfloat16), ((8, 0), "bf16", torch.bfloat16),
                                    ((7, 5), "fp16", torch.float16), ((7, 0), "fp16", torch.float16),
                                    ((6, 0), "fp32", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        args = argparse.Namespace(precision="auto")
        assert autocast_dtype(args, cuda) == dtype and args.precision == name
        args = argparse.Namespace(precision="fp32")
        assert autocast_dtype(args, cuda) is None and args.precision == "fp32"
    args = argparse.Namespace(precision="auto")
    assert autocast_dtype(args, torch.device("cpu")) is None and args.precision == "fp32"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_other_optimizers_and_no_projector(tmp_path, optimizer):
    run_script("simclr.py", *TINY, "--epochs", "1", "--max-steps", "2", "--optimizer", optimizer,
               "--proj-layers", "0", "--output-dir", tmp_path, "--knn-every", "0")
    assert not any(k.startswith("projector") for k in load(tmp_path / "last.pt")["model"])


def test_simclr_view_flags_reach_the_views(tmp_path):
    """--color-strength and --blur-prob change the first step's views (hence its loss: same seed,
    same weights) and are recorded; the default blur probability is recorded as what it was (0 at 8 px)."""
    losses = {}
    for name, flags in (("paper", []), ("solo", ["--color-strength", "1.0", "--blur-prob", "0.5"])):
        run_script("simclr.py", *TINY, "--epochs", "1", "--max-steps", "1", "--log-every", "1", "--knn-every", "0",
                   *flags, "--output-dir", tmp_path / name)
        losses[name] = next(csv.DictReader(open(tmp_path / name / "metrics.csv")))["loss"]
        args = json.loads((tmp_path / name / "args.json").read_text())
        assert (args["color_strength"], args["blur_prob"]) == ((1.0, 0.5) if flags else (0.5, 0.0))
    assert losses["paper"] != losses["solo"]


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py", "dino.py", "linear_eval.py"])
def test_help_documents_every_core_flag(script):
    out = run_script(script, "--help").stdout
    for flag in CORE_FLAGS:
        assert flag in out, f"{script} --help lacks {flag}"
    flat = " ".join(out.split())  # a default is shown once, and never as None
    assert "(default: None)" not in flat and not re.search(r"\(default: [^()]*\) \(default:", flat), flat
    assert "(default: 256)" in flat and "(default: auto)" in flat
    size = "the images' own size"  # linear_eval: the size the backbone was trained at
    size = f"the checkpoint's, with --ckpt random {size}" if script == "linear_eval.py" else size
    assert f"crop size in pixels (default: {size};" in flat, flat


def test_import_has_no_side_effects(tmp_path):
    code = ("import signal, simclr, byol, barlow, dino, linear_eval, common; "
            "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL; print('clean')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "clean\n" and proc.stderr == "", proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch,feat_dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("cifar_stem,size,spatial", [(True, 32, 4), (False, 96, 3)])
def test_backbones(arch, feat_dim, cifar_stem, size, spatial):
    import torch
    from simclr import build_backbone
    net, meta = build_backbone(arch, size)
    assert meta == {"arch": arch, "image_size": size, "cifar_stem": cifar_stem, "feat_dim": feat_dim}
    assert net(torch.randn(2, 3, size, size)).shape == (2, feat_dim)
    # The CIFAR stem keeps the resolution (32 px -> 4x4 before pooling); the ImageNet stem divides by 32.
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    assert trunk(torch.randn(1, 3, size, size)).shape[-1] == spatial


def test_unlabeled_folder_trains_without_knn(tmp_path):
    from PIL import Image
    (tmp_path / "flat").mkdir()
    for i in range(40):
        Image.new("RGB", (20, 24), (i * 6, 100, 255 - i * 6)).save(tmp_path / "flat" / f"{i}.png")
    proc = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", tmp_path / "flat", "--batch-size", "16",
                      "--epochs", "1", "--device", "cpu", "--workers", "0", "--knn-every", "1",
                      "--output-dir", tmp_path / "out")
    assert "40 images" in proc.stdout and "knn" not in proc.stdout
    assert load(tmp_path / "out" / "backbone.pt")["backbone_meta"]["image_size"] == 20  # the images' smaller side


@pytest.mark.parametrize("script,target", [("byol.py", True), ("barlow.py", False), ("dino.py", False)])
def test_method_then_linear_eval(tmp_path, script, target):
    run_script(script, *TINY, *METHODS[script], "--epochs", "1", "--knn-every", "1", "--output-dir", tmp_path)
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["method"] == script[:-3] and ckpt["step"] == 4
    assert any(k.startswith("target.") for k in ckpt["model"]) == target
    # The optimizer holds every trainable parameter (BYOL's predictor, DINO's whole student), no more.
    module = __import__(script[:-3])
    model = {"byol.py": "BYOL", "barlow.py": "BarlowTwins", "dino.py": "DINO"}[script]
    model = getattr(module, model)(argparse.Namespace(**ckpt["args"]), ckpt["args"]["image_size"])
    in_optimizer = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert in_optimizer == sum(p.requires_grad for p in model.parameters())
    if script == "dino.py":  # epoch 0: the prototypes stay fixed (--freeze-last-layer 1), the rest trains
        model = ckpt["model"]
        assert torch.equal(model["student.head.last_v"], model["teacher.head.last_v"])
        assert not torch.equal(model["student.head.mlp.0.weight"], model["teacher.head.mlp.0.weight"])
    assert load(tmp_path / "backbone.pt")["backbone"].keys() == ckpt["backbone"].keys()
    # The backbone evaluated: BYOL's online network (the paper's), DINO's teacher (its eval scripts').
    prefix = {"byol.py": "online.backbone.", "barlow.py": "backbone.", "dino.py": "teacher.backbone."}[script]
    for saved in (ckpt["backbone"], load(tmp_path / "backbone.pt")["backbone"]):
        assert all(torch.equal(v, ckpt["model"][prefix + k]) for k, v in saved.items())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows[-1]["kind"] == "epoch" and rows[-1]["knn_top1"] != ""
    # DINO logs the teacher entropy (collapse: 0 or log(out_dim)) in its own column, the others do not.
    assert ("teacher_entropy" in rows[0]) == (script == "dino.py")
    if script == "dino.py":
        assert all(0 < float(r["teacher_entropy"]) < math.log(256) for r in rows)
    run_script("linear_eval.py", "--ckpt", tmp_path / "last.pt", "--mode", "fast", "--epochs", "1",
               "--batch-size", "32", "--device", "cpu", "--workers", "0")
    results = json.loads((tmp_path / "linear_eval_fast" / "results.json").read_text())
    assert 0 <= results["top1"] <= 100 and results["dataset"] == "synthetic"


def test_dino_vit_writes_only_in_its_output_dir_then_linear_eval(tmp_path):
    """DINO with a ViT, multi-crop and gradient checkpointing, started from an empty working
    directory: every file goes to --output-dir, and linear_eval.py rebuilds the ViT from the
    checkpoint (patch size included) in both modes."""
    from conftest import DINO_VIT
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    proc = run_script(str(REPO / "dino.py"), *TINY, *DINO_VIT, "--epochs", "2", "--knn-every", "1",
                      "--output-dir", out, cwd=cwd)
    assert "vit_tiny, adamw lr 0.0005, 2 + 2 crops" in proc.stdout and "knn" in proc.stdout
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "backbone.pt", "last.pt", "metrics.csv"]
    ckpt = load(out / "last.pt")
    assert ckpt["backbone_meta"] == {"arch": "vit_tiny", "image_size": 16, "patch_size": 4, "feat_dim": 192}
    assert ckpt["args"]["weight_decay_end"] == 0.4 and ckpt["args"]["clip_grad"] == 3.0
    from dino import cosine_schedule
    decay, no_decay = ckpt["optimizer"]["param_groups"]  # weights: the cosine 0.04 -> 0.4 at step 7 of 8
    assert decay["weight_decay"] == cosine_schedule(7, 8, 0, 0.04, 0.4) and no_decay["weight_decay"] == 0.0
    assert not torch.equal(ckpt["model"]["student.head.last_v"], ckpt["model"]["teacher.head.last_v"])  # epoch 1
    assert torch.equal(ckpt["backbone"]["pos_embed"], ckpt["model"]["teacher.backbone.pos_embed"])
    for mode in ("fast", "linear"):
        run_script(str(REPO / "linear_eval.py"), "--ckpt", out / "backbone.pt", "--mode", mode, "--epochs", "1",
                   "--batch-size", "32", "--device", "cpu", "--workers", "0", "--output-dir", tmp_path / mode, cwd=cwd)
        results = json.loads((tmp_path / mode / "results.json").read_text())
        assert results["arch"] == "vit_tiny" and 0 <= results["top1"] <= 100
    assert list(cwd.iterdir()) == []


def test_dino_on_an_unlabeled_folder(tmp_path):
    from PIL import Image
    (tmp_path / "flat").mkdir()
    for i in range(40):
        Image.new("RGB", (24, 24), (i * 6, 100, 255 - i * 6)).save(tmp_path / "flat" / f"{i}.jpg")
    proc = run_script("dino.py", "--dataset", "imagefolder", "--data-dir", tmp_path / "flat", "--batch-size", "16",
                      "--epochs", "1", "--device", "cpu", "--workers", "0", "--knn-every", "1", "--arch", "vit_tiny",
                      "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64",
                      "--output-dir", tmp_path / "out")
    assert "40 images" in proc.stdout and "knn" not in proc.stdout
    assert load(tmp_path / "out" / "backbone.pt")["backbone_meta"]["patch_size"] == 4


@pytest.mark.parametrize("flag", [["--grad-checkpointing"], ["--drop-path", "0.2"]])
def test_dino_vit_flags_need_a_vit(tmp_path, flag):
    """With a ResNet these did nothing, yet --drop-path's value was recorded in args.json."""
    proc = run_script("dino.py", *TINY, *flag, "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and f"{flag[0]} applies to ViT backbones, not resnet18" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "last.pt").exists()


def test_dino_drop_path_default_follows_the_backbone():
    from dino import fill_recipe, get_args_parser
    for arch, expected in (("resnet18", 0.0), ("vit_tiny", 0.1)):
        args = get_args_parser().parse_args(["--arch", arch, "--image-size", "32"])
        fill_recipe(args)
        assert args.drop_path == expected
    args = get_args_parser().parse_args(["--drop-path", "0", "--image-size", "32"])  # with a ResNet: what it does
    fill_recipe(args)
    assert args.drop_path == 0.0


@pytest.mark.parametrize("script,extra,patch", [("barlow.py", METHODS["barlow.py"], "4"),
                                                ("linear_eval.py", ["--ckpt", "random"], "4"),
                                                ("linear_eval.py", ["--ckpt", "random"], "3")])
def test_patch_size_with_a_resnet_is_refused(tmp_path, script, extra, patch):
    """--patch-size with a ResNet did nothing, yet args.json recorded it: one line instead (linear_eval
    said that the 8 px images are not a multiple of the ViT patch size 3 of random)."""
    proc = run_script(script, *TINY, *extra, "--patch-size", patch, "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr == ("error: --patch-size applies to ViT backbones, not resnet18; "
                                                    "drop it or use --arch vit_*\n")
    assert not (tmp_path / "last.pt").exists()


def test_compile_trains_and_saves_the_plain_module(tmp_path):
    """--compile (torch.compile; on a CPU the first step compiles for about 30 s): the checkpoint
    holds the uncompiled module's keys, so it resumes and evaluates without --compile."""
    run_script("simclr.py", *TINY, "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--compile",
               "--output-dir", tmp_path)
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["compile"] is True
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    run_script("simclr.py", *TINY, "--epochs", "1", "--max-steps", "3", "--knn-every", "0", "--output-dir", tmp_path)
    assert load(tmp_path / "last.pt")["step"] == 3


def test_compile_without_a_compiler_fails_in_one_line(tmp_path):
    """torch.compile on a CPU needs a C++ compiler: without one, its error (100-200 lines of traceback
    from inside the compiler, on torch 2.3 and 2.14) is one line naming the cause and what to do."""
    env = clean_env(CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    # A fresh interpreter: the compiler's settings read CXX when torch imports them, before a fork of the tests'
    cmd = [sys.executable, REPO / "simclr.py", *TINY, "--epochs", "1", "--max-steps", "1", "--knn-every", "0",
           "--compile", "--output-dir", tmp_path / "run"]
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --compile needs a compiler (InvalidCxxCompiler: No working C++ compiler found in "
        f"torch._inductor.config.cpp.cxx: (None, '{tmp_path / 'no-such-g++'}')); drop --compile, or make one available "
        "(g++ on a CPU, gcc for Triton on a GPU; CXX or CC names it)"), proc.stderr


def test_any_other_compile_failure_keeps_its_traceback(tmp_path):
    """Only a missing compiler becomes one line: a failure inside the compiler (a lowering, a bug) keeps
    torch's traceback and its message, which a report to PyTorch needs."""
    wrapper = tmp_path / "bad_backend.py"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "def bad_backend(gm, inputs):\n"
        "    raise NotImplementedError('could not lower aten.something\\nmore detail')\n"
        "real = torch.compile\n"
        "torch.compile = lambda model, **kwargs: real(model, backend=bad_backend)\n"
        f"sys.argv[0] = {str(REPO / 'simclr.py')!r}\n"
        f"runpy.run_path({str(REPO / 'simclr.py')!r}, run_name='__main__')\n")
    proc = run_script(wrapper, *TINY, "--epochs", "1", "--max-steps", "1", "--knn-every", "0", "--compile",
                      "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "error: --compile" not in proc.stderr
    assert "could not lower aten.something\nmore detail" in proc.stderr, proc.stderr


def test_a_step_slower_than_a_tenth_of_a_second_per_image_is_not_printed_as_0_img_s(tmp_path, capsys, monkeypatch):
    """fp16 on a CPU, or a large ViT there, trains below 1 image/s: the console printed "0 img/s"."""
    import simclr
    logger = simclr.CSVLogger(tmp_path / "metrics.csv", simclr.FIELDS)
    run = argparse.Namespace(world_size=1, n_row=2, n_epoch=2, losses=torch.tensor([[3.0], [3.0]]), step=2, epoch=0,
                             total_steps=10, t_row=100.0, t_start=100.0, elapsed=0.0, lr=0.1, is_main=True,
                             device=torch.device("cpu"), logger=logger)
    args = argparse.Namespace(batch_size=16, output_dir=str(tmp_path))
    monkeypatch.setattr(simclr.time, "time", lambda: 164.0)  # 2 steps of 16 images in 64 s
    simclr.log_row(run, args, "step")
    assert " 0.50 img/s " in capsys.readouterr().out
    run.n_row, run.losses[0] = 2, 3.0
    monkeypatch.setattr(simclr.time, "time", lambda: 165.0)  # then in 1 s: 32 img/s, whole
    simclr.log_row(run, args, "step")
    assert " 32 img/s " in capsys.readouterr().out
    with open(tmp_path / "metrics.csv") as f:
        assert [r["img_per_s"] for r in csv.DictReader(f)] == ["0.5", "32.0"]


def test_dino_head_and_teacher_flags(tmp_path):
    """--no-norm-last-layer learns the norms of the prototypes (g moves away from 1; with the
    default they are fixed); the teacher and centre flags reach the run and its checkpoint."""
    flags = ["--no-norm-last-layer", "--freeze-last-layer", "0", "--momentum-teacher", "0.9",
             "--center-momentum", "0.5", "--student-temp", "0.2"]
    run_script("dino.py", *TINY, *METHODS["dino.py"], *flags, "--epochs", "1", "--knn-every", "0",
               "--output-dir", tmp_path)
    ckpt = load(tmp_path / "last.pt")
    assert (ckpt["args"]["norm_last_layer"], ckpt["args"]["momentum_teacher"], ckpt["args"]["center_momentum"],
            ckpt["args"]["student_temp"]) == (False, 0.9, 0.5, 0.2)
    g = ckpt["model"]["student.head.last_g"]
    assert not torch.allclose(g, torch.ones_like(g))
    import dino
    assert not dino.DINOHead(8, 16, 8, 4, norm_last_layer=True).last_g.requires_grad


def test_warm_up_longer_than_the_run_is_warned(tmp_path):
    """The recipe's 10 warm-up epochs in a 2-epoch run: the learning rate never gets to its value.
    A warm-up as long as the run is warned too (it reaches its value only after the last step)."""
    args = [*TINY, "--epochs", "2", "--max-steps", "1", "--knn-every", "0"]
    proc = run_script("simclr.py", *args, "--output-dir", tmp_path / "a")
    assert "warning: --warmup-epochs 10 covers the whole run" in proc.stderr
    proc = run_script("simclr.py", *args, "--warmup-epochs", "2", "--output-dir", tmp_path / "c")
    assert "warning: --warmup-epochs 2 covers the whole run" in proc.stderr
    proc = run_script("simclr.py", *args, "--warmup-epochs", "1", "--output-dir", tmp_path / "b")
    assert "warmup" not in proc.stderr


def test_step_rows_are_means_since_the_last_row_and_epoch_rows_their_epochs_mean(tmp_path):
    """--log-every 2, 4 steps per epoch: each step row is the mean loss of its 2 steps (the same run
    logged every step gives them), each epoch row the mean of the epoch's 4 steps."""
    args = [*TINY, "--epochs", "2", "--knn-every", "0", "--deterministic"]
    run_script("simclr.py", *args, "--log-every", "2", "--output-dir", tmp_path / "a")
    run_script("simclr.py", *args, "--log-every", "1", "--output-dir", tmp_path / "b")

    def losses(folder, kind):
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(folder / "metrics.csv"))
                if r["kind"] == kind}

    every2, every1 = losses(tmp_path / "a", "step"), losses(tmp_path / "b", "step")
    assert sorted(every2) == [2, 4, 6, 8] and sorted(every1) == list(range(1, 9))
    for step in every2:
        assert every2[step] == pytest.approx((every1[step - 1] + every1[step]) / 2, rel=1e-5)
    for folder in ("a", "b"):
        epochs = losses(tmp_path / folder, "epoch")
        assert epochs == pytest.approx({4: sum(every1[s] for s in range(1, 5)) / 4,
                                        8: sum(every1[s] for s in range(5, 9)) / 4}, rel=1e-5)


def test_the_readmes_code_for_using_a_trained_backbone_runs(pretrained):
    """The README's snippet, run as written on a checkpoint of the tiny run: the backbone loads
    whole, and gives the same features as the run's own model (last.pt) on the same images."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("To use a trained backbone in your own code")[1].split("```python\n")[1].split("```")[0]
    assert '"runs/simclr/backbone.pt"' in code
    code = code.replace('"runs/simclr/backbone.pt"', repr(str(pretrained / "backbone.pt")))
    check = (
        "from PIL import Image\n"
        "pil_images = [Image.new('RGB', (12, 10), (40 * i, 90, 200 - 30 * i)) for i in range(3)]\n"
        f"{code}\n"
        "from simclr import SimCLR\n"
        f"last = torch.load({str(pretrained / 'last.pt')!r}, weights_only=True)\n"
        "model = SimCLR(argparse.Namespace(**last['args']), meta['image_size'])\n"
        "model.load_state_dict(last['model'])\n"
        "x = torch.stack([transform(img) for img in pil_images])\n"
        "assert x.shape == (3, 3, 8, 8) and feats.shape == (3, 512), (x.shape, feats.shape)\n"
        "assert torch.equal(feats, model.backbone.eval()(x))\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_peak_memory_on_a_cpu_is_in_mib_on_linux_and_macos(monkeypatch):
    """getrusage's ru_maxrss is in KiB on Linux and in bytes on macOS (a laptop): the log's MiB were
    1024 times too large there."""
    import simclr

    class Usage:
        ru_maxrss = 2**30
    monkeypatch.setattr(simclr.resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(simclr.sys, "platform", "darwin")
    assert simclr.peak_memory_mb(torch.device("cpu")) == 1024
    monkeypatch.setattr(simclr.sys, "platform", "linux")
    assert simclr.peak_memory_mb(torch.device("cpu")) == 2**20
