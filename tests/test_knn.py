"""The weighted kNN monitor on hand-made features."""
import argparse
import csv
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import common
import simclr
from simclr import extract_features, knn_predict


def test_knn_predict_hand_computed():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    # k=2: neighbours are train 0 (cos 1, class 0) and train 1 (cos 0.8, class 1).
    scores = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.1)
    assert torch.allclose(scores, torch.tensor([[math.exp(10), math.exp(8)]]))
    # A higher temperature flattens the weights; with k=3 the two class-1 neighbours can win.
    scores = knn_predict(train, labels, test, num_classes=2, k=3, temperature=10.0)
    assert scores.argmax().item() == 1


def test_extract_features_keeps_dataset_order():
    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(10)]
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    feats, labels = extract_features(backbone, data, batch_size=4, workers=0, device=torch.device("cpu"), rank=0,
                                     world_size=1)
    expected = backbone(torch.stack([x for x, _ in data]))
    assert torch.allclose(feats, expected) and not backbone.training
    assert labels.tolist() == list(range(10))


def test_extract_features_draws_nothing_from_torchs_global_generator():
    """A kNN cut short by a stop is done again by the resumed run: had its loaders drawn their seeds
    from torch's generator, the resumed run's random numbers (DINO's drop path) would be shifted
    against an uninterrupted run's."""
    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(10)]
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    for workers in (0, 1):
        state = torch.get_rng_state()
        extract_features(backbone, data, batch_size=4, workers=workers, device=torch.device("cpu"), rank=0,
                         world_size=1)
        assert torch.equal(torch.get_rng_state(), state)


def test_an_unreadable_image_is_replaced_with_its_label(tmp_path, capsys):
    """A corrupt file is replaced by the next readable image: the kNN bank and the probe's features
    must carry that image's label, not the corrupt file's (which would count it under a wrong class)."""
    files = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), colour).save(files[-1])
    files[1].write_bytes(b"not an image")
    data = common.ImageSet(files=files, labels=[0, 1, 2], transform=torchvision.transforms.ToTensor())
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    feats, labels = extract_features(backbone, data, batch_size=2, workers=0, device=torch.device("cpu"), rank=0,
                                     world_size=1)
    assert labels.tolist() == [0, 2, 2] and torch.allclose(feats[1], feats[2])
    assert "skipping unreadable image" in capsys.readouterr().err


def test_extract_features_stops_when_asked_at_batches_every_process_has(monkeypatch):
    """A kNN on a large dataset takes minutes, more than a time limit's warning: it asks `stop`
    (Preemption.requested, an all-reduce) before each batch and gives None once told to stop. Only
    before the batches every process has: 9 images on 2 processes, batch 2, give rank 0 three
    batches and rank 1 two; an all-reduce in rank 0's third would wait forever for rank 1."""
    import simclr
    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(9)]
    backbone = torch.nn.Flatten()
    monkeypatch.setattr(simclr.dist, "all_gather", lambda out, t: [o.copy_(t) for o in out])  # no real group

    def extract(rank, stop_at):
        calls = []

        def stop():
            calls.append(len(calls))
            return len(calls) == stop_at
        out = extract_features(backbone, data, 2, 0, torch.device("cpu"), rank, 2, stop)
        return out, len(calls)

    for rank in (0, 1):
        out, calls = extract(rank, stop_at=None)
        assert out is not None and calls == 2
        out, calls = extract(rank, stop_at=2)
        assert out is None and calls == 2
    out, calls = extract(0, stop_at=1)
    assert out is None and calls == 1
    assert extract_features(backbone, data, 2, 0, torch.device("cpu"), 0, 1)[0].shape == (9, 12)  # no stop: as before


def test_knn_predict_defaults_are_k200_and_temperature_0_1():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(500, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (500,), generator=g)
    test = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    default = knn_predict(bank, labels, test, 5)
    assert torch.allclose(default, knn_predict(bank, labels, test, 5, k=200, temperature=0.1))
    assert not torch.allclose(default, knn_predict(bank, labels, test, 5, k=199, temperature=0.1))
    assert not torch.allclose(default, knn_predict(bank, labels, test, 5, k=200, temperature=0.09))


class Split:
    def __init__(self, feats, labels):
        self.feats, self.labels = feats, labels

    def with_transform(self, t):
        return self


def test_knn_accuracy_votes_by_cosine_similarity_not_dot_product(monkeypatch):
    """Class 0's bank feature points the test feature's way but is short; class 1's is long and at
    60 degrees. Cosine (weights e^10 and e^5): class 0 wins (100%); a dot product (weights e^10
    and e^50) would pick class 1 (0%)."""
    bank = torch.tensor([[1.0, 0.0], [10 * 0.5, 10 * 0.866]])
    data = argparse.Namespace(train=Split(bank, torch.tensor([0, 1])),
                              test=Split(torch.tensor([[1.0, 0.0]]), torch.tensor([0])),
                              num_classes=2, image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.setattr(simclr, "extract_features", lambda backbone, split, *a, **k: (split.feats, split.labels))
    args = argparse.Namespace(workers=0)
    assert simclr.knn_accuracy(None, data, args, torch.device("cpu"), 0, 1) == 100.0


def test_knn_predict_scores_every_test_row_beyond_a_chunk():
    """2,500 test rows (scored 1,024 at a time) against a row-by-row computation, k=3."""
    g = torch.Generator().manual_seed(0)
    train, test = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (50, 2500))
    labels = torch.randint(0, 4, (50,), generator=g)
    scores = knn_predict(train, labels, test, num_classes=4, k=3, temperature=0.5)
    assert scores.shape == (2500, 4)
    for i in (0, 1023, 1024, 2047, 2048, 2499):
        sim, idx = (train @ test[i]).topk(3)
        expected = torch.zeros(4).index_add_(0, labels[idx], (sim / 0.5).exp())
        torch.testing.assert_close(scores[i], expected)


def test_knn_monitor_uses_the_un_augmented_images(monkeypatch):
    """The monitor's bank and queries are centre crops (eval_transform) of both splits, not
    training views."""
    seen = []

    def recording(backbone, dataset, *args, **kwargs):
        seen.append(dataset)
        return torch.eye(2), torch.arange(2)

    monkeypatch.setattr(simclr, "extract_features", recording)
    x, y = common.synthetic_images(4, 8)
    data = argparse.Namespace(train=common.ImageSet(x, labels=y), test=common.ImageSet(x[:2], labels=y[:2]),
                              num_classes=2, image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert simclr.knn_accuracy(None, data, argparse.Namespace(workers=0), torch.device("cpu"), 0, 1) == 100.0
    expected = repr(common.eval_transform(8, (0.5,) * 3, (0.25,) * 3))
    assert [len(d) for d in seen] == [4, 2] and all(repr(d.transform) == expected for d in seen)


@pytest.mark.parametrize("script,prefix", [("byol.py", "online.backbone."), ("dino.py", "teacher.backbone.")])
def test_the_knn_monitor_scores_the_backbone_that_is_saved(tmp_path, monkeypatch, script, prefix):
    """BYOL's kNN scores the online network's backbone and DINO's the teacher's: those of
    backbone.pt, the ones linear_eval.py evaluates. Run in this process, to see the backbone the
    monitor gets after the last step (the weights last.pt then holds)."""
    from conftest import METHODS, TINY, load, main_in_this_process
    module, seen = importlib.import_module(script[:-3]), []

    def recording(backbone, *args, **kwargs):
        seen.append({k: v.clone() for k, v in backbone.state_dict().items()})
        return 50.0

    monkeypatch.setattr(module, "knn_accuracy", recording)
    argv = [*TINY, *METHODS[script], "--epochs", "1", "--knn-every", "1", "--output-dir", tmp_path]
    main_in_this_process(module, argv, monkeypatch)
    model = load(tmp_path / "last.pt")["model"]
    assert len(seen) == 1 and seen[0].keys() == load(tmp_path / "backbone.pt")["backbone"].keys()
    assert all(torch.equal(v, model[prefix + k]) for k, v in seen[0].items())


def test_the_knn_runs_at_due_epoch_ends_only(tmp_path):
    """--knn-every 1: after each complete epoch; --max-steps ending the run mid-epoch ends it without
    that epoch's kNN (as the README and --max-steps's help say), and without its epoch row."""
    from conftest import TINY, run_script
    out = tmp_path / "run"
    run_script("simclr.py", *TINY, "--epochs", "3", "--knn-every", "1", "--max-steps", "6", "--log-every", "2",
               "--output-dir", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [(r["kind"], r["step"], r["knn_top1"] != "") for r in rows] == [
        ("step", "2", False), ("step", "4", False), ("epoch", "4", True), ("step", "6", False)]
