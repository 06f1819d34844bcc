"""The linear probe trains on the right batches with the right schedule, and results.json reports
what the trained probe scores: each check here was missed by the other tests, found by mutating
linear_eval.py (a fixed batch order, features paired with other images' labels, an unscaled or
step-less warm-up, the probe's BatchNorm not trained, top-1 or kNN computed otherwise)."""
import argparse
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import linear_eval
from conftest import TINY, load, main_in_this_process, run_script


def constant_images(n, size=8):
    """Image i is all pixels i (uint8), label i: a crop or flip keeps the value, so a batch's images
    say which labels should come with them."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    return images, np.arange(n)


def decode(x, mean=0.5, std=0.25):
    """The index of each constant image, from its normalised pixels."""
    return ((x.flatten(1).mean(1) * std + mean) * 255).round().long()


@pytest.mark.parametrize("world_size", [1, 2])
def test_fast_batches_keep_each_feature_with_its_label_and_reshuffle_every_epoch(world_size):
    feats, labels = torch.arange(64.0)[:, None].repeat(1, 3), torch.arange(64)
    args = argparse.Namespace(mode="fast", batch_size=16, seed=0)
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            run = argparse.Namespace(world_size=world_size, rank=rank, device=torch.device("cpu"), steps_per_epoch=4)
            batches = list(linear_eval.epoch_batches(epoch, 0, run, args, None, None, feats, labels))
            assert len(batches) == 4 and all(len(y) == 16 // world_size for _, y in batches)
            assert all(torch.equal(f[:, 0].long(), y) for f, y in batches)  # the features of those labels
            seen.append(torch.cat([y for _, y in batches]))
            skipped = list(linear_eval.epoch_batches(epoch, 3, run, args, None, None, feats, labels))
            assert len(skipped) == 1 and torch.equal(skipped[0][1], batches[3][1])  # a resumed epoch: its last
        assert sorted(torch.cat(seen).tolist()) == list(range(64))  # every image once, over the processes
        orders.append(torch.cat(seen))
    assert not torch.equal(orders[0], orders[1])


def test_linear_batches_follow_the_epoch_and_keep_each_image_with_its_label():
    images, labels = constant_images(64)
    data = common.ImageSet(images, labels=labels)
    args = argparse.Namespace(mode="linear", batch_size=16, seed=0, aug_device="auto", workers=0, dataset="npz")
    probe_t = common.probe_transform(8, (0.5,) * 3, (0.25,) * 3)
    loader = common.pretrain_loader(data, [probe_t], 16, 1, 0, args, torch.device("cpu"))
    run = argparse.Namespace(world_size=1, rank=0, device=torch.device("cpu"), steps_per_epoch=len(loader),
                             memory_format=torch.contiguous_format, amp_dtype=None)
    backbone = torch.nn.Identity()  # the "features" are the augmented images themselves
    orders = []
    for epoch in (0, 1, 0):
        batches = list(linear_eval.epoch_batches(epoch, 0, run, args, backbone, loader, None, None))
        assert all(torch.equal(decode(x), y) for x, y in batches)
        orders.append(torch.cat([y for _, y in batches]))
        skipped = list(linear_eval.epoch_batches(epoch, 2, run, args, backbone, loader, None, None))
        assert torch.equal(torch.cat([y for _, y in skipped]), orders[-1][32:])  # a resumed epoch: its rest
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])


def test_a_fast_run_reports_what_its_probe_scores_with_the_documented_schedule(tmp_path):
    """One run (fast mode, 3 epochs of 4 steps, 1 of warm-up, stopped at step 6), then everything
    results.json says is recomputed from its last.pt: top-1/top-5 of the probe in eval mode on the
    test features, the kNN on normalised features; the logged lr is --lr x batch/256, warmed up over
    the first epoch's steps then cosine; the probe's BatchNorm has trained (MAE's probe)."""
    proc = run_script("linear_eval.py", *TINY, "--ckpt", "random", "--mode", "fast", "--epochs", "3",
                      "--warmup-epochs", "1", "--max-steps", "6", "--lr", "0.8", "--log-every", "1",
                      "--output-dir", tmp_path)
    assert "(synthetic test, fast mode, 6 of 12 steps (--max-steps)); written to" in proc.stdout  # not finished
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["kind"] == "step"]
    base = 0.8 * 32 / 256
    expected = [base * (s + 1) / 4 for s in range(4)] + [base * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in (0, 1)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)

    ckpt, results = load(tmp_path / "last.pt"), json.loads((tmp_path / "results.json").read_text())
    assert ckpt["head"]["0.num_batches_tracked"] == 6 == results["steps"] and results["total_steps"] == 12
    assert not torch.allclose(ckpt["head"]["0.running_var"], torch.ones(512))
    meta = ckpt["backbone_meta"]
    backbone, _ = linear_eval.build_backbone(meta["arch"], meta["image_size"])
    backbone.load_state_dict(ckpt["backbone"])
    data = common.load_data(argparse.Namespace(**{k: ckpt["args"][k] for k in (
        "dataset", "data_dir", "image_size", "val_fraction", "synthetic_size", "seed", "workers")}))
    eval_t = common.eval_transform(data.image_size, data.mean, data.std)
    (train, train_y), (test, test_y) = (linear_eval.extract_features(
        backbone, split.with_transform(eval_t), 32, 0, torch.device("cpu"), 0, 1) for split in (data.train, data.test))
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(512, affine=False), torch.nn.Linear(512, data.num_classes))
    head.load_state_dict(ckpt["head"])
    with torch.no_grad():
        top5 = head.eval()(test).topk(5, dim=1).indices
    assert results["top1"] == pytest.approx((top5[:, 0] == test_y).float().mean().item() * 100)
    assert results["top5"] == pytest.approx((top5 == test_y[:, None]).any(1).float().mean().item() * 100)
    assert results["top1"] < results["top5"]  # the check can tell them apart
    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # weighted kNN, k=200 > 128: every image votes
    votes = torch.zeros(len(test), data.num_classes).index_add_(1, train_y, (sims / 0.1).exp())
    assert results["knn_top1"] == pytest.approx((votes.argmax(1) == test_y).float().mean().item() * 100)


def test_top_5_is_not_reported_with_5_classes_or_fewer(tmp_path):
    """Top-5 of 5 classes or fewer is 100% whatever the probe: results.json holds null, and the
    line leaves it out."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", train_images=rng.integers(0, 255, (64, 8, 8, 3), np.uint8),
             train_labels=np.arange(64) % 3, test_images=rng.integers(0, 255, (30, 8, 8, 3), np.uint8),
             test_labels=np.arange(30) % 3)
    proc = run_script("linear_eval.py", "--ckpt", "random", "--dataset", "npz", "--data-dir", tmp_path / "three.npz",
                      "--mode", "fast", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--workers", "0",
                      "--output-dir", tmp_path / "probe")
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["top5"] is None and 0 <= results["top1"] <= 100 and results["steps"] == results["total_steps"] == 4
    assert "linear top-1" in proc.stdout and "top-5" not in proc.stdout and "--max-steps" not in proc.stdout


def test_a_probe_resumes_only_on_its_own_data(tmp_path):
    """A probe folder given another npz file of as many images resumed the old linear layer and scored
    it on the new test split, with a note only; with another number of classes, a traceback. Both are one
    line now, and results.json says which data it scored."""
    rng = np.random.default_rng(0)
    for name, classes in (("a", 2), ("b", 2), ("c", 3)):
        np.savez(tmp_path / f"{name}.npz", train_images=rng.integers(0, 255, (32, 8, 8, 3), np.uint8),
                 train_labels=np.arange(32) % classes, test_images=rng.integers(0, 255, (16, 8, 8, 3), np.uint8),
                 test_labels=np.arange(16) % classes)
    flags = ["--ckpt", "random", "--dataset", "npz", "--mode", "fast", "--epochs", "1", "--batch-size", "16",
             "--device", "cpu", "--workers", "0", "--knn-every", "0", "--output-dir", tmp_path / "probe"]
    run_script("linear_eval.py", *flags, "--data-dir", tmp_path / "a.npz")
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert (results["data_dir"], results["num_classes"], results["train_images"], results["test_images"]) == (
        str(tmp_path / "a.npz"), 2, 32, 16) and results["image_size"] == 8 and len(results["data_fingerprint"]) == 16
    before = (tmp_path / "probe" / "last.pt").read_bytes()
    for name, message in (("b", f"trained on other images or labels than --dataset npz --data-dir {tmp_path}/b.npz"),
                          ("c", "of 2 classes, these data have 3")):
        proc = run_script("linear_eval.py", *flags, "--data-dir", tmp_path / f"{name}.npz", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        last = tmp_path / "probe" / "last.pt"
        assert proc.stderr.strip().splitlines()[-1] == (f"error: {last} is a probe {message}: use the same data to "
                                                        "resume, or another --output-dir")
    assert (tmp_path / "probe" / "last.pt").read_bytes() == before
    (tmp_path / "moved").mkdir()
    (tmp_path / "a.npz").rename(tmp_path / "moved" / "a.npz")  # the same data, moved: resumed
    assert "resumed from" in run_script("linear_eval.py", *flags, "--data-dir", tmp_path / "moved" / "a.npz").stdout


def test_data_fingerprint_tells_image_folders_apart_by_their_files_not_their_place(tmp_path):
    """Files are not decoded: their names and first and last 4 KB (and the labels) tell two folders of as
    many images apart, also of BMPs (one file size for every image of one size); a copy elsewhere has the
    same fingerprint."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "one" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(tmp_path / "one" / c / f"{i}.bmp")
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    (tmp_path / "one" / "a").rename(tmp_path / "one" / "x")  # classes swapped: a's images are now b's, b's a's
    (tmp_path / "one" / "b").rename(tmp_path / "one" / "a")
    (tmp_path / "one" / "x").rename(tmp_path / "one" / "b")

    def fp(root):
        train, _, test, _ = common._image_folder(root, 0.25)
        return common.fingerprint(train, test)
    shutil.copytree(tmp_path / "copy", tmp_path / "copy2")
    assert fp(tmp_path / "copy") == fp(tmp_path / "copy2") != fp(tmp_path / "one")


def test_a_fast_probe_in_the_folder_of_an_older_version_is_pointed_at(tmp_path, pretrained):
    """Until 2026-12-01 a fast probe went to linear_eval/ beside the checkpoint, now linear_eval_fast/: the
    old command started a new probe there, leaving the old one behind without a word."""
    shutil.copy(pretrained / "backbone.pt", tmp_path / "backbone.pt")
    flags = ["--ckpt", tmp_path / "backbone.pt", "--mode", "fast", "--epochs", "1", "--batch-size", "32",
             "--device", "cpu", "--workers", "0", "--knn-every", "0"]
    run_script("linear_eval.py", *flags, "--max-steps", "1", "--output-dir", tmp_path / "linear_eval")  # its place
    proc = run_script("linear_eval.py", *flags)
    assert (f"note: {tmp_path / 'linear_eval' / 'last.pt'} is a fast probe of an older version, which wrote there: "
            f"to go on with it, give --output-dir {tmp_path / 'linear_eval'}; this one starts in "
            f"{tmp_path / 'linear_eval_fast'}") in proc.stdout, proc.stdout
    assert "note:" not in run_script("linear_eval.py", *flags).stdout  # resumed in its own folder: nothing to say


def test_the_documented_protocol_is_the_default():
    """The module docstring's protocol: SGD, lr 0.1 x batch/256, no weight decay, 100 epochs, batch 256,
    on augmented images (--mode linear)."""
    args = linear_eval.get_args_parser().parse_args(["--ckpt", "random"])
    got = (args.optimizer, args.lr, args.weight_decay, args.epochs, args.batch_size, args.mode, args.warmup_epochs)
    assert got == ("sgd", 0.1, 0.0, 100, 256, "linear", 0)


def test_probe_initialisation_saves_every_n_epochs_and_a_warm_up_as_long_as_the_run(tmp_path, monkeypatch, capsys):
    """Run in this process: the linear layer starts as MoCo's and DINO's (weights N(0, 0.01), biases 0);
    last.pt is written after every --save-every-th epoch (here the 2nd of 3) and at the end; a warm-up of
    every epoch is warned of (the learning rate never decays)."""
    made, saved = [], []
    make_optimizer, save_state = linear_eval.make_optimizer, linear_eval.save_state

    def recording_optimizer(params, args):
        params = list(params)
        made.append([p.detach().clone() for p in params])
        return make_optimizer(params, args)

    def recording_save(path, raw_head, optimizer, run, args):
        saved.append(run.step)
        return save_state(path, raw_head, optimizer, run, args)

    monkeypatch.setattr(linear_eval, "make_optimizer", recording_optimizer)
    monkeypatch.setattr(linear_eval, "save_state", recording_save)
    argv = [*TINY, "--ckpt", "random", "--mode", "fast", "--epochs", "3", "--save-every", "2", "--warmup-epochs", "3",
            "--knn-every", "0", "--output-dir", tmp_path]
    main_in_this_process(linear_eval, argv, monkeypatch)
    (weight, bias), = made
    assert weight.shape == (10, 512) and weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert abs(weight.mean().item()) < 1e-3 and torch.equal(bias, torch.zeros(10))
    assert saved == [8, 12]  # 4 steps per epoch: after epoch 2 of 3, then at the end
    assert "warning: --warmup-epochs 3 covers the whole run" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 3


def test_another_dataset_than_the_pretrainings_takes_the_usual_split(tmp_path, pretrained):
    """--val-fraction and --synthetic-size come from the checkpoint only for its own dataset (the same
    split as in pretraining); evaluated on another dataset, the usual defaults hold."""
    ckpt = load(pretrained / "last.pt")
    ckpt["args"]["val_fraction"] = 0.5  # pretrained with --val-fraction 0.5 (and --synthetic-size 128 64)
    torch.save(ckpt, tmp_path / "last.pt")
    from PIL import Image
    for c in range(2):
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), (c * 200, i * 10, 0)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    proc = run_script("linear_eval.py", "--ckpt", tmp_path / "last.pt", "--dataset", "imagefolder", "--data-dir",
                      tmp_path / "imgs", "--mode", "fast", "--epochs", "1", "--batch-size", "8", "--knn-every", "0",
                      "--device", "cpu", "--workers", "0", "--output-dir", tmp_path / "probe")
    assert "on imagefolder: 36 train / 4 test images" in proc.stdout
    args = json.loads((tmp_path / "probe" / "args.json").read_text())
    assert args["val_fraction"] == 0.1 and args["synthetic_size"] == [2000, 500]
