"""Tests of common.py, the data module: synthetic images, load_data for every local dataset kind
(synthetic, imagefolder, npz), ImageSet's seeded views, EpochSampler's sharding, train_loader's
independence from the number of workers, the augmentations and the data flags.

All data are built in tmp_path with numpy and PIL (images of a few pixels); nothing is downloaded.
"""
import argparse
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import common

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ---- Helpers -------------------------------------------------------------------------------


def make_args(dataset="synthetic", data_dir=".", image_size=None, val_fraction=0.1, synthetic_size=(40, 20),
              seed=0, workers=0):
    """The Namespace that load_data reads, as add_data_args (plus the script's --seed) builds it."""
    return argparse.Namespace(dataset=dataset, data_dir=str(data_dir), image_size=image_size,
                              val_fraction=val_fraction, synthetic_size=list(synthetic_size), seed=seed,
                              workers=workers)


def save_image(path, colour=(0, 0, 0), size=(8, 8)):
    """A plain image of `colour`, size (width, height), saved in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(colour)).save(path)
    return path


def class_folder(root, layout, size=(8, 8)):
    """Build root/<class>/<name> images from {class: [names]}; each image gets its own colour."""
    paths = []
    for c, names in layout.items():
        for name in names:
            paths.append(save_image(root / c / name, colour=(len(paths) * 20 % 256, 40, 200), size=size))
    return paths


def pixels(img):
    return np.asarray(img.convert("RGB"))


def imageset_files(s):
    return [os.fspath(p) for p in s.files]


def label_of(path, root, classes):
    """The expected label: index in `classes` of the class folder (the first folder under root)."""
    return classes.index(path.relative_to(root).parts[0])


def small_set(n=12, size=12, transform=None, labels=True, seed=0):
    x, y = common.synthetic_images(n, size, seed=3)
    return common.ImageSet(x, labels=y if labels else None, transform=transform, seed=seed)


def simclr_views(size=16):
    t = common.simclr_augmentation(size, MEAN, STD)
    return common.Views(t, t)


# ---- 1. synthetic_images -------------------------------------------------------------------


def test_synthetic_images_deterministic_for_a_seed():
    (x1, y1), (x2, y2) = common.synthetic_images(50, 16, seed=4), common.synthetic_images(50, 16, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x3, y3 = common.synthetic_images(50, 16, seed=5)
    assert not np.array_equal(x1, x3) and not np.array_equal(y1, y3)


def test_synthetic_images_shapes_dtypes_and_balanced_classes():
    x, y = common.synthetic_images(120, 20, seed=0)
    assert x.shape == (120, 20, 20, 3) and x.dtype == np.uint8
    assert y.shape == (120,) and y.dtype == np.int64
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 12))
    assert x.std() > 20  # drawn, not blank


def test_synthetic_colour_does_not_carry_the_class():
    """A nearest-class-mean classifier on mean RGB is near chance (10%)."""
    x, y = common.synthetic_images(2000, 32, seed=0)
    x_test, y_test = common.synthetic_images(500, 32, seed=1)
    feats, feats_test = x.reshape(len(x), -1, 3).mean(1), x_test.reshape(len(x_test), -1, 3).mean(1)
    centroids = np.stack([feats[y == c].mean(0) for c in range(10)])
    pred = np.argmin(((feats_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y_test).mean()
    assert accuracy < 0.2, accuracy


# ---- 2. load_data: synthetic ---------------------------------------------------------------


def test_load_synthetic_sizes_and_defaults():
    data = common.load_data(make_args(synthetic_size=(30, 20), seed=7))
    assert len(data.pretrain) == 30 and len(data.test) == 20
    assert data.train is data.pretrain
    assert data.num_classes == 10 and data.image_size == 32
    assert data.pretrain.images.shape == (30, 32, 32, 3)
    assert data.test.labels is not None and data.test.labels.dtype == np.int64
    assert data.pretrain.seed == data.test.seed == 7
    assert len(data.mean) == len(data.std) == 3
    assert all(0.2 < m < 0.8 for m in data.mean) and all(0.1 < s < 0.5 for s in data.std)
    img, label = data.test[0]
    assert isinstance(img, Image.Image) and 0 <= label < 10


def test_synthetic_test_images_are_not_training_images():
    data = common.load_data(make_args(synthetic_size=(20, 20)))
    train = data.pretrain.images.reshape(20, -1)
    assert not any((train == t.reshape(1, -1)).all(1).any() for t in data.test.images)


def test_load_synthetic_image_size_is_settable():
    data = common.load_data(make_args(synthetic_size=(10, 10), image_size=16))
    assert data.image_size == 16
    assert data.pretrain.images.shape[1:] == (16, 16, 3) and data.test.images.shape[1:] == (16, 16, 3)


def test_mean_std_of_in_memory_images_in_small_chunks():
    """Normalisation statistics of packed, npz and synthetic data: numpy's mean and std of the
    images, summed in chunks: float64 copies of them all took 16 times their size."""
    import tracemalloc
    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)
    images[..., 1] //= 4
    tracemalloc.start()
    mean, std = common._mean_std(images)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    x = images.reshape(-1, 3).astype(np.float64) / 255
    assert mean == tuple(x.mean(0).round(4)) and std == tuple(x.std(0).round(4)) and mean[1] < 0.2
    assert peak < images.nbytes  # was 16 times it


def test_mean_std_of_a_constant_channel_is_not_zero():
    """A channel that never changes (a blank channel, a constant npz): its std is floored at 0.001,
    not 0, which Normalize would divide by (inf and nan in every view)."""
    images = np.zeros((10, 4, 4, 3), np.uint8)
    images[..., 0] = 128
    mean, std = common._mean_std(images)
    assert mean == pytest.approx((128 / 255, 0, 0), abs=1e-4) and std == (0.001, 0.001, 0.001)


def test_cifar_and_stl10_splits_on_stand_ins_for_torchvision(monkeypatch):
    """load_data's cifar and stl10 branches, on stand-ins for torchvision's classes (nothing is
    downloaded): cifar's train=True split trains and train=False is the test split; STL10 pretrains
    on train+unlabeled (N x 3 x H x W, made N x H x W x 3) and its labeled images (label >= 0, class 0
    included) are the labeled train split."""
    class Cifar:
        def __init__(self, root, train, download):
            n = 6 if train else 4
            self.data, self.targets = np.full((n, 4, 4, 3), 1 if train else 2, np.uint8), list(range(n))
            self.classes = list("abcdefghij")

    class STL:
        def __init__(self, root, split, download):
            self.labels = np.array({"train+unlabeled": [0, 1, 2, -1, -1], "test": [2, 0]}[split])
            self.data = np.zeros((len(self.labels), 3, 5, 5), np.uint8)

    monkeypatch.setattr(common.torchvision.datasets, "CIFAR10", Cifar)
    monkeypatch.setattr(common.torchvision.datasets, "STL10", STL)
    data = common.load_data(make_args("cifar10"))
    assert data.pretrain is data.train and len(data.train) == 6 and (data.train.images == 1).all()
    assert len(data.test) == 4 and (data.test.images == 2).all() and data.num_classes == 10
    assert data.mean == common.NORMALISATION["cifar10"][0] and data.image_size == 4
    data = common.load_data(make_args("stl10"))
    assert len(data.pretrain) == 5 and data.pretrain.images.shape[1:] == (5, 5, 3)
    assert data.train.labels.tolist() == [0, 1, 2] and data.test.labels.tolist() == [2, 0] and data.num_classes == 10


def test_download_data_fetches_both_splits(monkeypatch, tmp_path):
    """--dataset cifar10/cifar100/stl10 download their training and test splits (STL10: train+unlabeled,
    the pretraining images, not only train); the other datasets download nothing."""
    calls = []

    def recorder(name):
        return lambda root, download, **kw: calls.append((name, root, download, kw))

    for name in ("CIFAR10", "CIFAR100", "STL10"):
        monkeypatch.setattr(common.torchvision.datasets, name, recorder(name))
    for dataset in ("cifar10", "cifar100", "stl10", "synthetic", "npz"):
        common.download_data(make_args(dataset, tmp_path))
    d = str(tmp_path)
    assert calls == [("CIFAR10", d, True, {"train": True}), ("CIFAR10", d, True, {"train": False}),
                     ("CIFAR100", d, True, {"train": True}), ("CIFAR100", d, True, {"train": False}),
                     ("STL10", d, True, {"split": "train+unlabeled"}), ("STL10", d, True, {"split": "test"})]

# ---- 3. load_data: imagefolder -------------------------------------------------------------


def test_imagefolder_class_folders(tmp_path):
    root = tmp_path / "imgs"
    # Created out of order: labels follow the sorted class names.
    paths = class_folder(root, {"dog": ["0.png", "1.JPG", "deep/er/2.jpeg"], "cat": ["0.png", "1.PNG", "x/3.bmp"],
                                "emu": ["0.jpg", "1.gif"]})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "labels.csv").write_text("a,b")
    save_image(root / "cat" / ".thumbs" / "t.png")  # hidden folder inside a class
    save_image(root / ".cache" / "c.png")  # hidden folder at the root: not a class
    save_image(root / "dog" / ".hidden.png")  # hidden file
    (root / "empty_class").mkdir()  # no images: not a class
    (root / "emu" / "album.jpg").mkdir()  # a folder with an image extension is not an image
    data = common.load_data(make_args("imagefolder", root, val_fraction=0.25))
    assert data.num_classes == 3 and data.train is data.pretrain
    classes = ["cat", "dog", "emu"]
    got = {p: int(lab) for s in (data.train, data.test) for p, lab in zip(imageset_files(s), s.labels)}
    assert sorted(got) == sorted(map(os.fspath, paths))
    for p in paths:
        assert got[os.fspath(p)] == label_of(p, root, classes), p
    assert data.mean == common.NORMALISATION["imagefolder"][0]


def test_imagefolder_split_is_deterministic_disjoint_and_sized(tmp_path):
    class_folder(tmp_path, {c: [f"{i}.png" for i in range(10)] for c in ("a", "b")})
    one = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.25))
    two = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.25))
    assert imageset_files(one.train) == imageset_files(two.train)
    assert imageset_files(one.test) == imageset_files(two.test)
    assert len(one.test) == 5 and len(one.train) == 15
    assert not set(imageset_files(one.train)) & set(imageset_files(one.test))
    assert np.array_equal(one.test.labels, two.test.labels)
    other = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.5))
    assert len(other.test) == 10
    assert len(common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.33)).test) == 7  # 6.6, rounded


def test_imagefolder_val_fraction_that_leaves_nothing_fails(tmp_path):
    class_folder(tmp_path, {"a": ["0.png", "1.png"], "b": ["2.png"]})
    with pytest.raises(SystemExit, match=r"^error: .*val-fraction"):
        common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.0))


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_imagefolder_train_and_held_out_folders(tmp_path, held_out):
    train = class_folder(tmp_path / "train", {"a": ["0.png", "1.png"], "b": ["0.png"], "c": ["0.png", "1.png"]})
    test = class_folder(tmp_path / held_out, {"c": ["0.png", "1.png", "2.png"], "a": ["0.png"]})
    data = common.load_data(make_args("imagefolder", tmp_path))
    assert data.num_classes == 3 and data.train is data.pretrain
    assert sorted(imageset_files(data.train)) == sorted(map(os.fspath, train))
    assert sorted(imageset_files(data.test)) == sorted(map(os.fspath, test))
    # Classes are mapped by name: val/c is class 2 of train/, although it is val's class 1.
    by_file = dict(zip(imageset_files(data.test), data.test.labels.tolist()))
    for p in test:
        assert by_file[os.fspath(p)] == "abc".index(p.parent.name)


def test_imagefolder_val_folder_is_held_out_rather_than_test(tmp_path):
    """train/, val/ and test/ all present: val/ is the split evaluated on (test/ stays untouched)."""
    class_folder(tmp_path / "train", {"a": ["0.png", "1.png"], "b": ["0.png"]})
    val = class_folder(tmp_path / "val", {"a": ["0.png"], "b": ["0.png"]})
    class_folder(tmp_path / "test", {"a": ["0.png", "1.png", "2.png"], "b": ["0.png"]})
    data = common.load_data(make_args("imagefolder", tmp_path))
    assert sorted(imageset_files(data.test)) == sorted(map(os.fspath, val))


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_imagefolder_held_out_folder_beside_the_classes_fails(tmp_path, held_out):
    """DIR/val/<class>/ beside DIR/<class>/ is a split put in the wrong place; scanned as ImageFolder
    scans it, its images would be trained on as one more class. A class folder named val that holds
    images only is a class."""
    class_folder(tmp_path, {"a": ["0.png"], "b": ["0.png"]})
    class_folder(tmp_path / held_out, {"a": ["0.png"], "b": ["0.png"]})
    with pytest.raises(SystemExit) as e:
        common.load_data(make_args("imagefolder", tmp_path))
    assert str(e.value) == (f"error: {tmp_path / held_out} holds class folders beside the class folders of --data-dir "
                            f"{tmp_path}: to hold it out, move the others into {tmp_path / 'train'} "
                            f"(DIR/train/<class>/ and DIR/{held_out}/<class>/)")
    shutil.rmtree(tmp_path / held_out)
    class_folder(tmp_path, {held_out: ["0.png", "1.png"]})
    assert common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.25)).num_classes == 3


def test_imagefolder_val_class_missing_from_train_fails(tmp_path):
    class_folder(tmp_path / "train", {"a": ["0.png"], "b": ["0.png"]})
    class_folder(tmp_path / "val", {"a": ["0.png"], "zebra": ["0.png"]})
    with pytest.raises(SystemExit) as e:
        common.load_data(make_args("imagefolder", tmp_path))
    msg = str(e.value)
    assert msg.startswith("error:") and str(tmp_path / "val") in msg and "zebra" in msg


def test_imagefolder_flat_folder_is_unlabeled(tmp_path, capsys):
    paths = [save_image(tmp_path / f"{i}.png", (i * 30, 0, 0)) for i in range(4)]
    paths.append(save_image(tmp_path / "more" / "x.jpg"))
    (tmp_path / "readme.txt").write_text("hi")
    data = common.load_data(make_args("imagefolder", tmp_path))
    assert data.train is None and data.test is None and data.num_classes == 0
    assert sorted(imageset_files(data.pretrain)) == sorted(map(os.fspath, paths))
    assert data.pretrain.labels is None and data.pretrain[0][1] == -1
    # Images beside sub-folders: the sub-folders are not classes, and the user is told so.
    assert "its sub-folders are not classes" in capsys.readouterr().err


def test_imagefolder_class_folder_without_images_is_named(tmp_path, capsys):
    """An empty class folder (ImageFolder stops on it) is no class: the labels count the others, and a
    line names it, as the pack's classes.json names the classes."""
    class_folder(tmp_path, {"a": ["0.png", "1.png"], "c": ["0.png", "1.png"]})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    data = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.25))
    assert data.num_classes == 2 and data.train.classes == ["a", "c"]
    assert f"warning: b in {tmp_path} holds no images: not a class (the 2 classes" in capsys.readouterr().err


def test_imagefolder_with_one_class_folder_is_unlabeled(tmp_path):
    """ImageFolder's usual way to hold unlabeled images (one dummy class): a kNN or a probe on one
    class would report 100% for nothing."""
    class_folder(tmp_path, {"all": [f"{i}.png" for i in range(6)]})
    data = common.load_data(make_args("imagefolder", tmp_path))
    assert data.train is None and data.test is None and data.num_classes == 0 and len(data.pretrain) == 6


def test_empty_test_split_means_no_evaluation():
    data = common.load_data(make_args(synthetic_size=(40, 0)))
    assert len(data.pretrain) == 40 and data.train is None and data.test is None and data.num_classes == 0


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images"])
def test_imagefolder_missing_or_empty_folder_fails(tmp_path, kind):
    root = tmp_path / "data"
    if kind != "missing":
        root.mkdir()
    if kind == "no_images":
        (root / "a").mkdir()
        (root / "a" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        common.load_data(make_args("imagefolder", root))
    assert str(e.value).startswith("error:") and str(root) in str(e.value)


@pytest.mark.parametrize("size, expected", [((12, 10), 10), ((10, 13), 10), ((300, 400), 224)])
def test_imagefolder_default_image_size(tmp_path, size, expected):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", size=size)
    assert common.load_data(make_args("imagefolder", tmp_path)).image_size == expected
    assert common.load_data(make_args("imagefolder", tmp_path, image_size=6)).image_size == 6


def test_imagefolder_default_image_size_is_the_median_not_the_first_file(tmp_path):
    """One thumbnail that sorts first ("a_thumb.png" beside large images) set the whole run's crop
    size to 8 px; the median shorter side of the folder's images sets it now."""
    save_image(tmp_path / "a_thumb.png", size=(8, 8))
    for i in range(4):
        save_image(tmp_path / f"img{i}.png", size=(60, 48))
    (tmp_path / "broken.png").write_bytes(b"")  # an unreadable file in the sample counts for nothing
    assert common.load_data(make_args("imagefolder", tmp_path)).image_size == 48


def test_imagefolder_symlinked_folders_are_followed_as_by_imagefolder(tmp_path):
    """A link to a folder of tiles inside a class folder was left out without a word (Path.rglob does not
    follow it), while a linked class folder was read: both are read, as torchvision's ImageFolder does,
    and a link back up does not loop."""
    tiles = class_folder(tmp_path / "elsewhere", {"tiles": ["t0.png", "t1.png"]})
    class_folder(tmp_path / "data", {"a": ["0.png"], "b": ["0.png"]})
    (tmp_path / "data" / "a" / "more").symlink_to(tmp_path / "elsewhere" / "tiles")
    (tmp_path / "data" / "a" / "loop").symlink_to(tmp_path / "data" / "a")
    (tmp_path / "data" / "c").symlink_to(tmp_path / "elsewhere" / "tiles")
    (tmp_path / "data" / "b" / "gone.png").symlink_to(tmp_path / "nothing.png")  # a broken link: no image
    (tmp_path / "data" / "b" / "up").symlink_to(tmp_path / "data")  # above: a's and c's images are not b's
    data = common.load_data(make_args("imagefolder", tmp_path / "data", val_fraction=0.25))
    files = sorted(data.train.files + data.test.files)
    assert len(files) == 6 and data.num_classes == 3
    assert sum(p.parent.name == "more" for p in files) == 2 and {p.name for p in files} >= {t.name for t in tiles}
    # One folder reached by two paths: read at the same one whatever order the file system lists them in
    class_folder(tmp_path / "two", {"sub1": ["x.png"], "sub15": ["y.png"]})
    (tmp_path / "two" / "sub2").symlink_to(tmp_path / "two" / "sub1")
    (tmp_path / "two" / "a_link").symlink_to(tmp_path / "two" / "sub1")
    assert [p.relative_to(tmp_path / "two").as_posix() for p in common._list_images(tmp_path / "two")] == [
        "sub1/x.png", "sub15/y.png"]


@pytest.mark.parametrize("val", ["empty", "flat", "empty_class"])
def test_imagefolder_held_out_folder_that_does_not_fit_says_how(tmp_path, val):
    """Each way val/ can fail to match train/ has its own line (all three said "must hold the same class
    sub-folders ... (unknown: [])", also for a class whose train/ folder was there but empty)."""
    class_folder(tmp_path / "train", {"a": ["0.png"], "b": ["0.png"]})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "val").mkdir()
    if val == "flat":
        save_image(tmp_path / "val" / "0.png")
    if val == "empty_class":
        class_folder(tmp_path / "val", {"a": ["0.png"], "empty": ["0.png"]})
    with pytest.raises(SystemExit) as e:
        common.load_data(make_args("imagefolder", tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"error: {tmp_path / 'val'} ") and "unknown: []" not in msg
    assert {"empty": "holds no images", "flat": "not class sub-folders: sort them into sub-folders named as",
            "empty_class": "has class folders that"}[val] in msg
    assert val != "empty_class" or msg.split(":")[2].strip().startswith("empty;")


def test_an_image_past_pils_size_limit_is_skipped_like_an_unreadable_one(tmp_path, monkeypatch, capsys):
    """Past PIL's decompression-bomb limit (179 megapixels: a whole satellite scene), Image.open raises
    DecompressionBombError, which is no OSError: it ended packing and training with a traceback."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2 x 1000 pixels: past twice the limit
    save_image(tmp_path / "a.png", (255, 0, 0))
    save_image(tmp_path / "b_scene.png", size=(100, 40))
    img, i = common.ImageSet(files=[tmp_path / "b_scene.png", tmp_path / "a.png"]).load(0)
    assert i == 1 and "b_scene.png" in capsys.readouterr().err
    assert common._list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "b_scene.png"]
    assert common.pack_image_folder(tmp_path, tmp_path / "packed", 8) == [tmp_path / "b_scene.png"]


def test_corrupt_image_is_skipped_with_one_warning(tmp_path, capsys):
    save_image(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    save_image(tmp_path / "c.png", (0, 0, 255))
    data = common.load_data(make_args("imagefolder", tmp_path))
    assert [os.path.basename(p) for p in data.pretrain.files] == ["a.png", "bad.jpg", "c.png"]
    capsys.readouterr()
    img, _ = data.pretrain[1]  # bad.jpg: the next readable image instead
    assert np.array_equal(pixels(img), np.full((8, 8, 3), (0, 0, 255), np.uint8))
    err = capsys.readouterr().err
    assert "warning" in err and str(tmp_path / "bad.jpg") in err
    data.pretrain[1], data.pretrain[(3, 1)]
    data.pretrain.with_transform(T.ToTensor())[1]  # a copy for another transform: same process, no repeat
    assert capsys.readouterr().err == ""


def test_all_images_corrupt_raises(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"junk")
    s = common.ImageSet(files=sorted(tmp_path.iterdir()))
    with pytest.raises(RuntimeError, match="3 unreadable images in a row"):
        s.load(0)
    with pytest.raises(SystemExit, match="error: 3 unreadable images in a row"):  # one line from load_data
        common.load_data(make_args("imagefolder", tmp_path))


def test_a_run_of_fewer_than_100_unreadable_images_is_skipped(tmp_path):
    """Up to 100 unreadable files in a row are skipped (a batch of broken files in a large folder);
    only then is the folder taken for the problem."""
    files = [tmp_path / f"{i:02d}.jpg" for i in range(30)]
    for f in files:
        f.write_bytes(b"junk")
    files.append(save_image(tmp_path / "99.png", (0, 0, 255)))
    img, i = common.ImageSet(files=files).load(0)
    assert i == 30 and np.array_equal(pixels(img)[0, 0], (0, 0, 255))


def test_corrupt_image_replacement_keeps_its_own_label(tmp_path):
    files = [save_image(tmp_path / "a" / "0.png", (255, 0, 0)), tmp_path / "a" / "1.jpg",
             save_image(tmp_path / "b" / "0.png", (0, 0, 255))]
    files[1].write_bytes(b"not an image")
    s = common.ImageSet(files=files, labels=np.array([0, 0, 1]))
    img, label = s[1]
    assert np.array_equal(pixels(img)[0, 0], (0, 0, 255))  # b/0.png was returned...
    assert label == 1  # ...so its label must be b's


def test_imagefolder_train_folder_without_val(tmp_path):
    class_folder(tmp_path / "train", {c: [f"{i}.png" for i in range(5)] for c in ("cat", "dog")})
    data = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.2))
    assert data.num_classes == 2
    assert set(data.train.labels.tolist()) | set(data.test.labels.tolist()) == {0, 1}


def test_imagefolder_hidden_file_at_root_is_ignored(tmp_path):
    class_folder(tmp_path, {c: [f"{i}.png" for i in range(5)] for c in ("cat", "dog")})
    save_image(tmp_path / "._cat.jpg")  # macOS AppleDouble file, as left by copying from a Mac
    data = common.load_data(make_args("imagefolder", tmp_path, val_fraction=0.2))
    assert data.num_classes == 2 and data.train is not None
    assert not any(os.path.basename(p).startswith(".") for p in data.pretrain.files)


# ---- 4. load_data: npz (MedMNIST layout) ---------------------------------------------------


def write_npz(path, n=12, size=6, rgb=False, splits=("train", "val", "test"), label_cols=1, seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, s in enumerate(splits):
        shape = (n + i, size, size, 3) if rgb else (n + i, size, size)
        arrays[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 4 if label_cols == 1 else 2, (n + i, label_cols)).astype(np.uint8)
    arrays.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_npz_grey_images_become_three_channels(tmp_path):
    arrays = write_npz(tmp_path / "m.npz", n=12, size=6)
    data = common.load_data(make_args("npz", tmp_path / "m.npz"))
    x = data.pretrain.images
    assert x.shape == (12, 6, 6, 3) and x.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(x[..., c], arrays["train_images"])
    assert data.image_size == 6 and data.train is data.pretrain
    assert data.pretrain.labels.shape == (12,) and data.pretrain.labels.dtype == np.int64
    assert np.array_equal(data.pretrain.labels, arrays["train_labels"][:, 0])
    assert len(data.test) == 14 and np.array_equal(data.test.labels, arrays["test_labels"][:, 0])  # test_, not val_
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    assert data.num_classes == labels.max() + 1
    assert len(data.mean) == 3 and all(0 < s < 1 for s in data.std)
    assert pixels(data.pretrain[0][0]).shape == (6, 6, 3)


def test_npz_classes_count_the_test_labels_too(tmp_path):
    """A class seen only in the test split still has a column in the probe (not an index error)."""
    images = np.zeros((4, 6, 6), np.uint8)
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.array([[0], [1], [0], [1]]),
             test_images=images, test_labels=np.array([[0], [2], [1], [0]]))
    assert common.load_data(make_args("npz", tmp_path / "m.npz")).num_classes == 3


def test_npz_rgb_and_single_channel_images(tmp_path):
    arrays = write_npz(tmp_path / "rgb.npz", rgb=True)
    data = common.load_data(make_args("npz", tmp_path / "rgb.npz"))
    assert np.array_equal(data.pretrain.images, arrays["train_images"])
    one = arrays["train_images"][..., :1]
    np.savez(tmp_path / "one.npz", train_images=one, train_labels=arrays["train_labels"],
             test_images=one, test_labels=arrays["train_labels"])
    data = common.load_data(make_args("npz", tmp_path / "one.npz"))
    assert np.array_equal(data.pretrain.images, np.repeat(one, 3, axis=-1))


def test_npz_test_split_falls_back_to_val(tmp_path):
    arrays = write_npz(tmp_path / "m.npz", splits=("train", "val"))
    data = common.load_data(make_args("npz", tmp_path / "m.npz"))
    assert len(data.test) == len(arrays["val_labels"])
    assert np.array_equal(data.test.labels, arrays["val_labels"][:, 0])


def test_npz_multilabel_is_unlabeled(tmp_path):
    write_npz(tmp_path / "chest.npz", label_cols=14)
    data = common.load_data(make_args("npz", tmp_path / "chest.npz"))
    assert data.train is None and data.test is None and data.num_classes == 0
    assert len(data.pretrain) == 12 and data.pretrain[0][1] == -1


def test_npz_folder_with_one_file(tmp_path):
    arrays = write_npz(tmp_path / "d" / "only.npz")
    (tmp_path / "d" / "readme.txt").write_text("x")
    data = common.load_data(make_args("npz", tmp_path / "d"))
    assert np.array_equal(data.pretrain.images[..., 0], arrays["train_images"])


def test_npz_errors_name_the_path(tmp_path):
    def error(path):
        with pytest.raises(SystemExit) as e:
            common.load_data(make_args("npz", path))
        assert str(e.value).startswith("error:") and str(path) in str(e.value), str(e.value)
        return str(e.value)

    error(tmp_path / "nothing.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8))
    assert "train_images" in error(tmp_path / "x.npz")
    np.savez(tmp_path / "f.npz", train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.zeros((2, 1)))
    assert "float32" in error(tmp_path / "f.npz")
    write_npz(tmp_path / "two" / "a.npz"), write_npz(tmp_path / "two" / "b.npz")
    assert "found 2" in error(tmp_path / "two")
    (tmp_path / "none").mkdir()
    assert "found 0" in error(tmp_path / "none")
    (tmp_path / "text.npz").write_text("train_images\n1,2,3\n")
    assert "not a readable .npz" in error(tmp_path / "text.npz")
    write_npz(tmp_path / "whole.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:300])
    assert "not a readable .npz" in error(tmp_path / "cut.npz")
    images = np.zeros((4, 4, 4), np.uint8)
    np.savez(tmp_path / "short.npz", train_images=images, train_labels=np.zeros(3, np.int64))
    assert "4 images, 3 labels" in error(tmp_path / "short.npz")
    np.savez(tmp_path / "neg.npz", train_images=images, train_labels=np.array([0, 1, -1, 1]))
    assert "1 negative" in error(tmp_path / "neg.npz")


# ---- 5. ImageSet: seeded views -------------------------------------------------------------


def test_same_key_gives_the_same_views():
    s = small_set(transform=simclr_views(16), seed=3)
    (a1, a2), label = s[(2, 5)]
    (b1, b2), label_again = s[(2, 5)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and label == label_again
    assert a1.shape == (3, 16, 16)
    assert not torch.equal(a1, a2)  # the two views of one call differ
    (c1, c2), _ = s[(3, 5)]
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)  # another epoch: other views
    (d1, _), _ = s[(2, 6)]
    assert not torch.equal(a1, d1)
    (e1, _), _ = s.with_transform(s.transform)[(2, 5)]
    assert torch.equal(a1, e1)
    other_seed = common.ImageSet(s.images, labels=s.labels, transform=s.transform, seed=4)
    assert not torch.equal(a1, other_seed[(2, 5)][0][0])


def test_int_key_is_epoch_zero():
    s = small_set(transform=simclr_views(16))
    assert torch.equal(s[4][0][0], s[(0, 4)][0][0])


def test_getitem_leaves_global_rng_untouched():
    s = small_set(transform=simclr_views(16))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    s[(1, 3)], s[(0, 2)]
    assert torch.equal(before, torch.get_rng_state())


def test_with_transform_returns_a_copy():
    s = small_set()
    t = common.eval_transform(12, MEAN, STD)
    s2 = s.with_transform(t)
    assert s2 is not s and s2.transform is t and s.transform is None
    assert s2.images is s.images and s2.seed == s.seed
    assert isinstance(s[0][0], Image.Image) and torch.is_tensor(s2[0][0])


def test_unlabeled_set_returns_minus_one():
    assert small_set(labels=False)[3][1] == -1
    assert small_set(labels=True)[3][1] >= 0


# ---- 6. EpochSampler -----------------------------------------------------------------------


def sampled(n, world_size, rank, epoch=0, skip=0, seed=0):
    sampler = common.EpochSampler(range(n), world_size, rank, seed)
    sampler.set_epoch(epoch, skip=skip)
    return sampler


def test_sampler_yields_epoch_index_pairs():
    pairs = list(sampled(20, 1, 0, epoch=3))
    assert all(e == 3 for e, _ in pairs)
    assert sorted(i for _, i in pairs) == list(range(20))


def test_two_ranks_split_each_global_batch():
    n, batch = 64, 8
    one = [i for _, i in sampled(n, 1, 0, epoch=2)]
    ranks = [[i for _, i in sampled(n, 2, r, epoch=2)] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    for b in range(n // batch):
        local = ranks[0][b * batch // 2:(b + 1) * batch // 2] + ranks[1][b * batch // 2:(b + 1) * batch // 2]
        assert sorted(local) == sorted(one[b * batch:(b + 1) * batch]), b


def test_sampler_skip_drops_this_ranks_first_indices():
    for world_size, rank in ((1, 0), (2, 1)):
        full = list(sampled(30, world_size, rank, epoch=1))
        skipped = sampled(30, world_size, rank, epoch=1, skip=7)
        assert list(skipped) == full[7:]
        assert len(skipped) == len(full) - 7
    again = sampled(30, 1, 0, epoch=1, skip=7)
    again.set_epoch(2)  # a new epoch starts from the beginning
    assert len(list(again)) == len(again) == 30


def test_sampler_drops_the_images_that_do_not_split_evenly():
    """127 images on 2 processes: 63 each, all different (padding would repeat one, and the epoch of
    two processes would differ from one process's)."""
    ranks = [[i for _, i in sampled(127, 2, r)] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 63 and len(set(ranks[0] + ranks[1])) == 126


def test_sampler_permutation_depends_on_epoch_and_seed():
    def order(**kw):
        return [i for _, i in sampled(50, 1, 0, **kw)]

    assert order(epoch=0) == order(epoch=0)
    assert order(epoch=0) != order(epoch=1)
    assert order(epoch=0) != order(epoch=0, seed=1)


# ---- 7. train_loader -----------------------------------------------------------------------


def loader_batches(workers, epochs=(0, 1), batches=2):
    x, y = common.synthetic_images(40, 12, seed=1)
    s = common.ImageSet(x, labels=y, transform=simclr_views(12), seed=5)
    loader = common.train_loader(s, 8, 1, 0, workers, seed=5, pin_memory=False)
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        for b, batch in enumerate(loader):
            if b == batches:
                break
            out.append(batch)
    return loader, out


def test_loader_drops_the_partial_batch():
    x, y = common.synthetic_images(30, 8, seed=0)
    s = common.ImageSet(x, labels=y, transform=common.eval_transform(8, MEAN, STD))
    loader = common.train_loader(s, 8, 1, 0, 0, seed=0, pin_memory=False)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert all(imgs.shape == (8, 3, 8, 8) and labels.shape == (8,) for imgs, labels in batches)
    two = common.train_loader(s, 4, 2, 1, 0, seed=0, pin_memory=False)  # rank 1 of 2: 15 images -> 3 batches of 4
    two.sampler.set_epoch(0)
    assert [len(b[1]) for b in two] == [4, 4, 4]


def test_loader_views_do_not_depend_on_workers():
    _, serial = loader_batches(workers=0)
    loader, parallel = loader_batches(workers=2)
    del loader  # stop the persistent workers
    assert len(serial) == len(parallel) == 4
    for (v_serial, y_serial), (v_parallel, y_parallel) in zip(serial, parallel):
        assert torch.equal(y_serial, y_parallel)
        assert all(torch.equal(a, b) for a, b in zip(v_serial, v_parallel))
    assert not torch.equal(serial[0][0][0], serial[2][0][0])  # epochs 0 and 1 differ


class Unpicklable(common.ImageSet):
    def __reduce__(self):
        raise TypeError("the dataset was pickled for a loader process")


@pytest.mark.parametrize("default", ["forkserver", "spawn"])
def test_loader_processes_are_forked_whatever_the_default_start_method(default):
    """Python 3.14's default start method on Linux is forkserver, which pickles the dataset to every
    loader process (a packed dataset's memory map in full, at every kNN). The training loader and
    extract_features (the kNN's, linear_eval's) fork them: they share the images, nothing is pickled."""
    import multiprocessing
    import simclr
    x, y = common.synthetic_images(16, 8, seed=0)
    data = Unpicklable(x, labels=y, transform=common.eval_transform(8, MEAN, STD))
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(default, force=True)
    try:
        loader = common.train_loader(data, 4, 1, 0, 2, seed=0, pin_memory=False)
        loader.sampler.set_epoch(0)
        assert len(list(loader)) == 4
        del loader  # its persistent loader processes end
        feats, labels = simclr.extract_features(torch.nn.Flatten(), data, 4, 2, torch.device("cpu"), 0, 1)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert feats.shape == (16, 3 * 8 * 8) and labels.tolist() == y.tolist()


# ---- 8. simclr_augmentation ----------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 64])
def test_simclr_augmentation_matches_the_paper_without_blur(size):
    t = common.simclr_augmentation(size, MEAN, STD)
    crop, flip, jitter, grey, to_tensor, norm = t.transforms
    assert isinstance(crop, T.RandomResizedCrop) and tuple(crop.size) == (size, size)
    assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    (cj,) = jitter.transforms
    assert isinstance(cj, T.ColorJitter)
    for interval in (cj.brightness, cj.contrast, cj.saturation):
        assert tuple(interval) == pytest.approx((0.6, 1.4))
    assert tuple(cj.hue) == pytest.approx((-0.1, 0.1))
    assert isinstance(grey, T.RandomGrayscale) and grey.p == 0.2
    assert isinstance(to_tensor, T.ToTensor)
    assert isinstance(norm, T.Normalize) and tuple(norm.mean) == MEAN and tuple(norm.std) == STD
    assert not any(isinstance(x, T.GaussianBlur) for x in t.transforms)


@pytest.mark.parametrize("size", [65, 96, 224])
def test_simclr_augmentation_blurs_large_images(size):
    t = common.simclr_augmentation(size, MEAN, STD)
    blur = t.transforms[4]
    assert isinstance(blur, T.RandomApply) and blur.p == 0.5
    (g,) = blur.transforms
    assert isinstance(g, T.GaussianBlur)
    k = g.kernel_size[0]
    assert g.kernel_size[0] == g.kernel_size[1] and k % 2 == 1 and abs(k - 0.1 * size) <= 1.5, k
    assert tuple(g.sigma) == pytest.approx((0.1, 2.0))
    assert isinstance(t.transforms[-1], T.Normalize)


@pytest.mark.parametrize("size,kernel", [(32, 13), (4, 7), (96, 9)])
def test_simclr_augmentation_of_another_strength_and_blur(size, kernel):
    """--color-strength s and --blur-prob (solo-learn's CIFAR views: s = 1, blur p = 0.5): jitter
    0.8s/0.8s/0.8s/0.2s; the blur kernel 10% of the image above 64 px, else 13 taps (PIL's blur is
    not cut off), fewer where reflect padding needs them (a 4 px image: 7)."""
    t = common.simclr_augmentation(size, MEAN, STD, strength=1.0, blur_p=0.3)
    (cj,) = t.transforms[2].transforms
    for interval in (cj.brightness, cj.contrast, cj.saturation):
        assert tuple(interval) == pytest.approx((0.2, 1.8))
    assert tuple(cj.hue) == pytest.approx((-0.2, 0.2))
    blur = t.transforms[4]
    assert isinstance(blur, T.RandomApply) and blur.p == 0.3
    (g,) = blur.transforms
    assert tuple(g.kernel_size) == (kernel, kernel) and tuple(g.sigma) == pytest.approx((0.1, 2.0))
    torch.manual_seed(0)
    assert t(Image.fromarray(common.synthetic_images(1, 40, seed=0)[0][0])).shape == (3, size, size)
    assert not any(isinstance(x, T.RandomApply) and isinstance(x.transforms[0], T.GaussianBlur)
                   for x in common.simclr_augmentation(96, MEAN, STD, blur_p=0.0).transforms)


@pytest.mark.parametrize("size", [8, 96])
def test_simclr_augmentation_output_shape(size):
    img = Image.fromarray(common.synthetic_images(1, 40, seed=0)[0][0])
    torch.manual_seed(0)
    out = common.simclr_augmentation(size, MEAN, STD)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32


def blur_and_solarize_positions(t):
    kinds = [type(x.transforms[0] if isinstance(x, T.RandomApply) else x) for x in t.transforms]
    return [[i for i, k in enumerate(kinds) if k is kind] for kind in (T.GaussianBlur, T.RandomSolarize)]


def test_byol_views_blur_above_64_px_only_and_before_solarising():
    """BYOL's (and DINO's) PIL views: no blur at 64 px or less (solo-learn's CIFAR recipe), blur above;
    a view both blurred and solarised is blurred first, as in BYOL's recipe and the batched views."""
    for t in common.byol_augmentations(64, MEAN, STD):
        assert blur_and_solarize_positions(t)[0] == []
    for t in common.byol_augmentations(65, MEAN, STD) + common.dino_augmentations(96, MEAN, STD, 2, 32, (0.4, 1),
                                                                                  (0.05, 0.4)):
        (blur,), (solarize,) = blur_and_solarize_positions(t)
        assert blur < solarize
    for t in common.dino_augmentations(96, MEAN, STD, 2, 32, (0.4, 1), (0.05, 0.4)):  # DINO: at least 13 taps
        assert tuple(t.transforms[blur_and_solarize_positions(t)[0][0]].transforms[0].kernel_size) == (13, 13)


def test_views_come_in_the_order_of_their_transforms():
    """Views(t1, t2, ...): view i is transform i's (BYOL's asymmetric pair, DINO's global crops first)."""
    views = common.Views(lambda img: ("first", img), lambda img: ("second", img))
    assert views("x") == [("first", "x"), ("second", "x")]


# ---- 9. eval_transform and probe_transform -------------------------------------------------


def test_eval_transform_centre_crops_deterministically():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)  # 8 high, 16 wide: the centre 8 x 8 is kept
    t = common.eval_transform(8, MEAN, STD)
    out = t(Image.fromarray(arr))
    centre = torch.from_numpy(arr[:, 4:12]).permute(2, 0, 1).float() / 255
    expected = (centre - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out, t(Image.fromarray(arr)))


def test_eval_transform_large_images():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8))
    t = common.eval_transform(96, MEAN, STD)
    resize = next(x for x in t.transforms if isinstance(x, T.Resize))
    assert resize.size in (110, [110])  # 96 / 0.875, the ImageNet centre crop
    out = t(img)
    assert out.shape == (3, 96, 96) and torch.equal(out, t(img))


def test_eval_transform_of_64_px_is_not_cropped():
    """64 px or less: resized to the size itself (the whole image); the 0.875 crop only above."""
    resize = next(x for x in common.eval_transform(64, MEAN, STD).transforms if isinstance(x, T.Resize))
    assert resize.size in (64, [64])


def test_probe_transform_is_the_standard_crop_and_flip():
    """The linear protocol's training views (MoCo, SimCLR, DINO): a random-resized crop of 8-100% of
    the area, aspect ratio 3/4 to 4/3, and a horizontal flip."""
    img = Image.fromarray(common.synthetic_images(1, 30, seed=0)[0][0])
    t = common.probe_transform(12, MEAN, STD)
    assert t(img).shape == (3, 12, 12)
    assert any(isinstance(x, T.RandomHorizontalFlip) for x in t.transforms)
    crop = next(x for x in t.transforms if isinstance(x, T.RandomResizedCrop))
    assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))


# ---- 10. add_data_args ---------------------------------------------------------------------


def data_parser():
    parser = argparse.ArgumentParser()
    common.add_data_args(parser)
    return parser


def test_data_args_defaults():
    args = data_parser().parse_args([])
    assert args.dataset == "cifar10" and args.data_dir == "./data" and args.image_size is None
    assert args.val_fraction == 0.1 and args.synthetic_size == [2000, 500]
    assert args.workers == min(8, len(os.sched_getaffinity(0))) and args.workers >= 1


def test_data_args_parse():
    args = data_parser().parse_args(["--dataset", "npz", "--data-dir", "/x/y.npz", "--image-size", "28",
                                     "--val-fraction", "0.2", "--synthetic-size", "10", "5", "--workers", "3"])
    assert (args.dataset, args.data_dir, args.image_size, args.val_fraction, args.synthetic_size, args.workers) == \
        ("npz", "/x/y.npz", 28, 0.2, [10, 5], 3)
    for name in common.DATASETS:
        assert data_parser().parse_args(["--dataset", name]).dataset == name


def test_data_args_reject_unknown_dataset(capsys):
    with pytest.raises(SystemExit):
        data_parser().parse_args(["--dataset", "imagenet"])
    assert "invalid choice" in capsys.readouterr().err


# ---- Known bugs ----------------------------------------------------------------------------


def test_large_seed_gives_views():
    s = small_set(transform=simclr_views(12), seed=20240501)  # a date as seed
    (v1, v2), _ = s[(3, 5)]
    assert v1.shape == (3, 12, 12) and not torch.equal(v1, v2)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """convert("RGB") clips a 16-bit PNG to 255 (all white); it is scaled to 8 bits, as torchvision's
    to_dtype(uint8, scale=True) does. A floating-point image is skipped with a warning, by name."""
    (tmp_path / "a").mkdir()
    ramp = (np.arange(256, dtype=np.uint16)[None, :].repeat(8, 0) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp16.png")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "a" / "float.tiff")
    files = [tmp_path / "a" / "ramp16.png", tmp_path / "a" / "float.tiff"]
    img, i = common.ImageSet(files=files).load(0)
    assert img.mode == "RGB" and i == 0
    assert np.array_equal(np.asarray(img)[0, :, 0], np.arange(256))
    img, i = common.ImageSet(files=files).load(1)  # the float image is skipped: the next one comes
    assert i == 0


def test_12_bit_data_in_16_bit_images_is_named_once(tmp_path, monkeypatch, capsys):
    """12-bit camera data saved as 16-bit PNGs is read as 0-15 (nearly black): the first such file is
    named, once per process; full-range 16-bit images say nothing."""
    monkeypatch.setattr(common, "_warned_dark", [])
    for name, top in (("full.png", 65535), ("dim0.png", 4095), ("dim1.png", 3000)):
        Image.fromarray(np.linspace(0, top, 64, dtype=np.uint16).reshape(8, 8)).save(tmp_path / name)
    s = common.ImageSet(files=[tmp_path / "full.png", tmp_path / "dim0.png", tmp_path / "dim1.png"])
    s.load(0)
    assert capsys.readouterr().err == ""
    img, _ = s.load(1)
    s.load(2)
    err = capsys.readouterr().err
    assert np.asarray(img).max() == 15 and err.count("warning:") == 1 and "dim0.png uses 12 bits" in err


def test_32_bit_integer_images_of_16_bit_values_are_scaled(tmp_path):
    """Mode "I" (32-bit integer pixels, as some Pillow versions open 16-bit PNGs and as 16-bit TIFFs
    may be stored): scaled to 8 bits like a 16-bit image, not clipped to white."""
    ramp = (np.arange(256)[None, :].repeat(8, 0) * 257).astype(np.int32)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.tiff")
    with Image.open(tmp_path / "ramp.tiff") as img:
        assert img.mode == "I"
    img, _ = common.ImageSet(files=[tmp_path / "ramp.tiff"]).load(0)
    assert np.array_equal(np.asarray(img)[0, :, 0], np.arange(256))
