"""Packing an image folder once into memory-mapped uint8 arrays (python common.py pack), then
training on it with --dataset packed and the batched augmentation."""
import json

import numpy as np
import pytest
from PIL import Image

import common
from conftest import TINY, load, run_script


def make_folder(root, labeled=True):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs") if labeled else ("",):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(20):
            size = (24 + i, 20 + 2 * i)  # various sizes: resized and centre-cropped when packed
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / ("cats" if labeled else "") / "broken.jpg").write_bytes(b"not a jpeg")


def test_pack_reports_bad_files_and_trains(tmp_path):
    make_folder(tmp_path / "imgs")
    proc = run_script("common.py", "pack", "--data-dir", tmp_path / "imgs", "--out", tmp_path / "packed",
                      "--image-size", "16", "--val-fraction", "0.25")
    assert "broken.jpg" in proc.stderr and "1 unreadable files left out" in proc.stdout
    train = np.load(tmp_path / "packed" / "train_images.npy", mmap_mode="r")
    test = np.load(tmp_path / "packed" / "test_images.npy", mmap_mode="r")
    assert train.dtype == np.uint8 and train.shape[1:] == (16, 16, 3) and len(train) + len(test) == 40
    labels = np.load(tmp_path / "packed" / "train_labels.npy")
    assert len(labels) == len(train) and set(labels) == {0, 1}
    classes = json.loads((tmp_path / "packed" / "classes.json").read_text())
    assert classes == {"num_classes": 2, "classes": ["cats", "dogs"]}
    # The same images as the folder's (its split), in its order, resized and centre-cropped, with their labels.
    import torchvision.transforms as T
    pretrain, _, held_out, _ = common._image_folder(tmp_path / "imgs", 0.25)
    resize = T.Compose([T.Resize(16), T.CenterCrop(16)])
    for split, name in ((pretrain, "train"), (held_out, "test")):
        readable = [(f, y) for f, y in zip(split.files, split.labels) if f.name != "broken.jpg"]
        expected = np.stack([np.asarray(resize(Image.open(f).convert("RGB"))) for f, _ in readable])
        assert np.array_equal(np.load(tmp_path / "packed" / f"{name}_images.npy"), expected)
        assert np.load(tmp_path / "packed" / f"{name}_labels.npy").tolist() == [y for _, y in readable]
    data = common.load_data(type("A", (), {"dataset": "packed", "data_dir": tmp_path / "packed", "image_size": None,
                                           "seed": 0})())
    assert isinstance(data.pretrain.images, np.memmap) and data.num_classes == 2 and data.image_size == 16
    out = tmp_path / "run"
    proc = run_script("simclr.py", *TINY[9:], "--dataset", "packed", "--data-dir", tmp_path / "packed",
                      "--batch-size", "8", "--epochs", "1", "--knn-every", "1", "--output-dir", out)
    assert "knn" in proc.stdout and load(out / "last.pt")["step"] == len(train) // 8


def test_pack_an_unlabeled_folder(tmp_path):
    make_folder(tmp_path / "flat", labeled=False)
    run_script("common.py", "pack", "--data-dir", tmp_path / "flat", "--out", tmp_path / "packed", "--image-size", "8")
    assert not (tmp_path / "packed" / "train_labels.npy").exists()
    assert np.load(tmp_path / "packed" / "train_images.npy").shape == (20, 8, 8, 3)
    proc = run_script("byol.py", "--dataset", "packed", "--data-dir", tmp_path / "packed", "--batch-size", "4",
                      "--epochs", "1", "--device", "cpu", "--workers", "0", "--proj-hidden-dim", "32",
                      "--pred-hidden-dim", "32", "--output-dir", tmp_path / "run")
    assert "20 images at 8 px (unlabeled: no kNN)" in proc.stdout and "knn" not in proc.stdout


def test_packed_without_arrays_is_one_clear_line(tmp_path):
    proc = run_script("simclr.py", *TINY[9:], "--dataset", "packed", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "holds no train_images.npy; make it with python common.py pack" in proc.stderr


def test_pack_into_an_unwritable_place_is_one_clear_line(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "file").write_text("not a folder")
    proc = run_script("common.py", "pack", "--data-dir", tmp_path / "imgs", "--out", tmp_path / "file" / "packed",
                      "--image-size", "8", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot write the packed arrays to --out" in proc.stderr.strip().splitlines()[-1]


def test_repacking_replaces_every_file_and_an_interrupted_pack_is_no_dataset(tmp_path, monkeypatch):
    """Packing again into the same folder leaves no file of the earlier pack (an unlabeled folder
    over a labeled one: no stale test split or labels). A pack cut short (here while writing the
    training images, written last) leaves no train_images.npy, so it is not taken for a dataset."""
    make_folder(tmp_path / "imgs")
    make_folder(tmp_path / "flat", labeled=False)
    common.pack_image_folder(tmp_path / "imgs", tmp_path / "packed", 8)
    assert (tmp_path / "packed" / "test_images.npy").exists()
    common.pack_image_folder(tmp_path / "flat", tmp_path / "packed", 8)
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["train_images.npy"]

    common.pack_image_folder(tmp_path / "imgs", tmp_path / "packed", 8)
    save = np.save

    def interrupted(f, array):
        if str(getattr(f, "name", "")).endswith("train_images.npy.part"):
            f.write(b"\x93NUMPY half an array")
            raise KeyboardInterrupt
        save(f, array)
    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.pack_image_folder(tmp_path / "imgs", tmp_path / "packed", 8)
    monkeypatch.setattr(np, "save", save)
    assert not (tmp_path / "packed" / "train_images.npy").exists()
    proc = run_script("simclr.py", *TINY[9:], "--dataset", "packed", "--data-dir", tmp_path / "packed", check=False)
    assert proc.returncode == 1 and "holds no train_images.npy; make it with python common.py pack" in proc.stderr


def test_a_pack_cut_short_in_its_test_split_is_no_dataset(tmp_path, monkeypatch):
    """The test split is written first, the training images last: a pack cut short while writing
    the test images leaves no train_images.npy, not a training set without its test split (which
    --dataset packed would take for an unlabeled one and train on without a word)."""
    make_folder(tmp_path / "imgs")
    save = np.save

    def interrupted(f, array):
        if str(getattr(f, "name", "")).endswith("test_images.npy.part"):
            raise KeyboardInterrupt
        save(f, array)
    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.pack_image_folder(tmp_path / "imgs", tmp_path / "packed", 8)
    assert not (tmp_path / "packed" / "train_images.npy").exists()


def test_damaged_packed_array_is_one_clear_line(tmp_path):
    make_folder(tmp_path / "imgs")
    common.pack_image_folder(tmp_path / "imgs", tmp_path / "packed", 8)
    path = tmp_path / "packed" / "train_images.npy"
    path.write_bytes(path.read_bytes()[:-100])  # truncated, as by a copy cut short
    proc = run_script("simclr.py", *TINY[9:], "--dataset", "packed", "--data-dir", tmp_path / "packed", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the train arrays in --data-dir {tmp_path / 'packed'} are damaged")
    assert last.endswith("pack the image folder again")


@pytest.mark.parametrize("damage,named", [
    (lambda d: np.save(d / "train_labels.npy", np.load(d / "train_labels.npy")[:5]), "labels for"),
    (lambda d: np.save(d / "test_labels.npy", np.load(d / "test_labels.npy") + 1), "2 classes"),  # one label = 2
    (lambda d: (d / "classes.json").unlink(), "no readable classes.json")])
def test_a_damaged_pack_is_one_line(tmp_path, damage, named):
    make_folder(tmp_path / "imgs")
    run_script("common.py", "pack", "--data-dir", tmp_path / "imgs", "--out", tmp_path / "packed", "--image-size", "16")
    damage(tmp_path / "packed")
    proc = run_script("simclr.py", *TINY[9:], "--dataset", "packed", "--data-dir", tmp_path / "packed",
                      "--batch-size", "8", "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert named in proc.stderr and "pack the image folder again" in proc.stderr
