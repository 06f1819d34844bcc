"""Data loading and augmentation shared by simclr.py, linear_eval.py and the other method scripts.

Only data lives here: datasets, augmentations and the loader (and the data flags, with three
argparse types that check flag values and the --help format, and the checks that a resumed
checkpoint fits the command line and the model). Everything a reader needs to learn a method
(model, loss, optimiser, distributed training, checkpoints) is written out in the method script
itself.

Datasets (--dataset):
  cifar10, cifar100  torchvision, downloaded into --data-dir
  stl10              pretraining on train+unlabeled (105k images), evaluation on train/test
  imagefolder        any folder of images; class sub-folders give labels, a flat folder is unlabeled;
                     train/ and val/ (or test/) sub-folders are used when present
  npz                MedMNIST-style arrays: train_images, train_labels, val_*, test_*
  packed             an image folder packed once into uint8 .npy arrays, memory-mapped:
                     python common.py pack --data-dir FOLDER --out PACKED --image-size 64
  synthetic          10 procedurally drawn shape classes, made in memory in a second (tests, demos)

Small-image datasets are held in memory as uint8 arrays (N, H, W, 3) and augmented in batches on
the training device (BatchedView); image folders are read from disk in the loader's workers.

Every augmentation is seeded by (seed, epoch, image index) in the PIL pipeline, by (seed, epoch,
global batch) in the batched one, not by the worker or process that happens to load the image: a
run gives the same views whatever the number of workers or processes, and a run resumed in the
middle of an epoch sees exactly the views it would have seen.
"""
import argparse
import copy
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "npz", "packed", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# What PIL raises for a file it cannot read: damaged or not an image, or past its decompression-bomb limit
# (twice Image.MAX_IMAGE_PIXELS, about 179 megapixels: a whole satellite scene, to be cut into tiles first).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Per-channel mean and std of the training images; datasets not listed compute theirs.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


def at_least(low, kind=int, high=None):
    """An argparse type for numbers >= low (and <= high if given): `--log-every 0` is refused in one
    usage line that names the flag, not found later as a ZeroDivisionError in the middle of a run."""
    def parse(text):
        value = kind(text)
        if not (value >= low and math.isfinite(value)):  # nan and inf too
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, not {text}" if kind is float else
                                             f"must be at most {high}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse then says "invalid int value: 'x'" for a non-number
    return parse


def positive(text):
    """An argparse type: a number above 0 (a temperature, a trust coefficient)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def fraction(text):
    """An argparse type: a number from 0 to 1 (a momentum, a drop probability)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, except None: the flag's help says what happens then."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_data_args(parser, size_default="the images' own size"):
    """The data flags, identical in every script (linear_eval leaves --dataset, --data-dir, --image-size,
    --val-fraction and --synthetic-size unset: the checkpoint's values fill them)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, help="which dataset")
    g.add_argument("--data-dir", default="./data",
                   help="dataset folder (download target for cifar/stl10, image folder, or .npz file)")
    g.add_argument("--image-size", type=at_least(1), default=None,
                   help=f"crop size in pixels (default: {size_default}; imagefolder: the median shorter side, "
                        "up to 224)")
    g.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="imagefolder without train/ and val/ (or test/): fraction held out for evaluation")
    g.add_argument("--synthetic-size", type=at_least(0), nargs=2, default=[2000, 500], metavar=("TRAIN", "TEST"),
                   help="number of synthetic train and test images")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    g.add_argument("--workers", type=at_least(0), default=min(8, cpus),
                   help="data-loading processes per training process")
    g.add_argument("--aug-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: in-memory images are augmented in batches on the training device; cpu: PIL "
                        "in --workers processes")
    return g


# ---- Datasets ------------------------------------------------------------------------------


class UnreadableImages(RuntimeError):
    """Many images in a row could not be read: the folder is the problem, not one file. The scripts'
    __main__ turn it into one error line, also when a loader process raised it."""


_warned_dark = []  # the 16-bit file warned about in this process (once)


def to_rgb(img, path=None):
    """A PIL image in RGB. 16-bit images (PNGs of scanners and microscopes) are scaled to 8 bits
    first (>> 8, as torchvision's to_dtype(uint8, scale=True) does to decode_png's uint16 output):
    convert("RGB") would clip them to 255, all white. 12-bit data stored in 16 bits (many cameras)
    becomes 0-15, nearly black: the first such file is named. The alpha channel is dropped and EXIF
    orientation ignored, as by torchvision's ImageFolder loader."""
    if img.mode.startswith("I"):  # I;16, I;16B, I (how some Pillow versions open 16-bit PNGs)
        values = np.clip(np.asarray(img), 0, 65535)
        if 0 < values.max() < 4096 and not _warned_dark:
            _warned_dark.append(path)
            print(f"warning: {path or 'a 16-bit image'} uses 12 bits or fewer (maximum {values.max()}), and 16-bit "
                  "images are read as value // 256: it is nearly black; rescale such images to the full 16-bit "
                  "range (or save them with 8 bits) before training", file=sys.stderr, flush=True)
        img = Image.fromarray((values >> 8).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("a floating-point image: no 8-bit scale to read it with; save it with 8 or 16 bits")
    return img.convert("RGB")


class ImageSet(torch.utils.data.Dataset):
    """Images in memory (uint8 array N x H x W x 3) or as files, with labels or without (None).

    Indexed by an int, or by (epoch, index) as EpochSampler yields: the transform's random
    numbers are then drawn from a generator seeded with (seed, epoch, index).
    """

    def __init__(self, images=None, files=None, labels=None, transform=None, seed=0, classes=None):
        self.images, self.files, self.labels, self.classes = images, files, labels, classes  # classes: names
        self.transform, self.seed = transform, seed
        self._warned = set()

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.files)

    def with_transform(self, transform):
        out = copy.copy(self)
        out.transform = transform
        return out

    def load(self, i):
        """(PIL image, index of the image actually loaded)."""
        if self.images is not None:
            return Image.fromarray(self.images[i]), i
        # A corrupt file is reported by name and replaced by the next readable one (with its own
        # label), so that one bad JPEG does not kill a three-day run.
        tries = min(len(self.files), 100)
        for j in range(tries):
            path = self.files[(i + j) % len(self.files)]
            try:
                with Image.open(path) as img:
                    return to_rgb(img, path), (i + j) % len(self.files)
            except UNREADABLE as e:
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({e}); delete or replace it "
                          f"({len(self._warned)} skipped in this process)", file=sys.stderr, flush=True)
        raise UnreadableImages(f"{tries} unreadable images in a row from {self.files[i]} on: check the image folder")

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        img, i = self.load(i)
        if self.transform is not None:
            # torchvision's transforms draw from torch's global generator: fork it, seed it.
            with torch.random.fork_rng(devices=[]):
                seed = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]  # any --seed, no collisions
                torch.random.default_generator.manual_seed(int(seed))
                img = self.transform(img)
        return img, -1 if self.labels is None else int(self.labels[i])


@dataclass
class Data:
    pretrain: ImageSet  # what self-supervised training sees (labels unused)
    train: ImageSet | None  # labeled split for the kNN bank and the linear probe (None: unlabeled)
    test: ImageSet | None  # labeled split the accuracy is measured on
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


def fail(msg):
    """Stop with one clear line (no traceback): what went wrong and what to do."""
    raise SystemExit(f"error: {msg}")


def check_same_flags(path, saved, args, keys):
    """Resuming: fail unless each flag in `keys` has the value `path` was trained with (a flag that
    an older checkpoint did not record is not checked)."""
    for key in keys:
        old, new, dashed = saved.get(key), getattr(args, key), key.replace("_", "-")
        if key in saved and old != new:
            what = (f"--{'' if old else 'no-'}{dashed}, not --{'' if new else 'no-'}{dashed}" if isinstance(new, bool)
                    else f"--{dashed} {old}, not {new}")  # as typed on the command line
            fail(f"{path} was trained with {what}: use the same value to resume, or another --output-dir")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v  # (0.05, 0.4) default or [0.05, 0.4] from the command line


def _shown(v):
    return "not given" if v is None else _plain(v)  # --max-steps left out, say


def _changed(saved, args, same_anyway=("output_dir", "resume")):
    return [key for key, new in vars(args).items()
            if key in saved and key not in same_anyway and _plain(saved[key]) != _plain(new)]


def note_changed_flags(path, saved, args):
    """Resuming with flags that may change (--lr, --epochs, a temperature, ...): one line naming the
    old and new values, since args.json and the next checkpoint hold only the new ones."""
    changed = [f"--{key.replace('_', '-')} {_shown(getattr(args, key))} (was {_shown(saved[key])})"
               for key in _changed(saved, args)]
    if changed:
        print(f"note: {path} continues with other values of {', '.join(changed)}", flush=True)


def keep_trained_flags(path, saved, args, is_main):
    """Resuming a run that has no step left to train (a finished run started again, by a sweep's script
    given another element's index, say): no step is trained with the flags that differ from the
    checkpoint's, so the run keeps its own, instead of being saved again as trained with the new ones.
    The paths (--data-dir, --output-dir, --resume) may differ: the same data or run, moved; so may
    --workers, which a postponed epoch end's kNN still uses on this machine."""
    changed = _changed(saved, args, ("output_dir", "resume", "data_dir", "workers"))
    if changed and is_main:
        kept = ", ".join(f"--{key.replace('_', '-')} {_shown(saved[key])} ({_shown(getattr(args, key))} given)"
                         for key in changed)
        print(f"note: {path} has no step left to train: it keeps the values it was trained with, {kept}", flush=True)
    for key in changed:
        setattr(args, key, saved[key])


def check_not_past_end(path, step, steps_per_epoch, args):
    """Resuming: fail if the checkpoint has trained past the end that --epochs and --max-steps now
    give (a run extended, then its first command again): it would be saved again, and args.json
    written, as trained with values it went past."""
    if step > args.epochs * steps_per_epoch:
        fail(f"{path} has trained {step} steps ({step / steps_per_epoch:.4g} epochs): past --epochs {args.epochs}; "
             f"give --epochs {-(-step // steps_per_epoch)} or more to go on from it, or another --output-dir")
    if args.max_steps and step > args.max_steps:
        fail(f"{path} has trained {step} steps: past --max-steps {args.max_steps}; give --max-steps {step} or "
             "more, or leave it out, or another --output-dir")


def check_same_model(path, saved, model):
    """Resuming: fail unless the checkpoint's model entries have the names and shapes of `model`'s.
    With the same flags they differ only for a checkpoint of another version of the script, which
    load_state_dict would refuse with a long traceback."""
    here = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    there = {name: tuple(t.shape) for name, t in saved.items()}
    for name in sorted(here.keys() | there.keys()):
        if here.get(name) != there.get(name):
            held = f"{name} of shape {there[name]}" if name in there else f"no {name}"
            mine = f"one of shape {here[name]}" if name in here else "none"
            fail(f"{path} holds {held}, the model here has {mine}: it was written by another version of the script; "
                 "resume with that version, or use another --output-dir")


def download_data(args):
    """Download cifar/stl10 into --data-dir (call on rank 0 only, before load_data)."""
    cls = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}.get(args.dataset)
    if cls is None:
        return
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        fail(f"--data-dir {args.data_dir} is a file, not a folder; give the folder that holds (or will hold) "
             f"{args.dataset}")
    try:
        stl = cls == "STL10"
        splits = [{"split": "train+unlabeled"}, {"split": "test"}] if stl else [{"train": True}, {"train": False}]
        for kw in splits:
            getattr(torchvision.datasets, cls)(args.data_dir, download=True, **kw)
    except Exception as e:  # torchvision raises URLError, HTTPError, RuntimeError... all mean the same here
        fail(f"could not download {args.dataset} into {args.data_dir} ({type(e).__name__}: {e}). Without internet, run "
             f"python -c \"import torchvision; torchvision.datasets.{cls}('{args.data_dir}', download=True)\" "
             f"on a machine that has it (a login node) and copy {args.data_dir} here")


def load_data(args):
    """Build the pretraining, labeled train and test sets selected by --dataset (no download)."""
    name, root = args.dataset, args.data_dir
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        tr, te = (_torchvision_set(cls, root, train=flag) for flag in (True, False))
        train, test = ImageSet(tr.data, labels=np.array(tr.targets)), ImageSet(te.data, labels=np.array(te.targets))
        pretrain, num_classes = train, len(tr.classes)
    elif name == "stl10":
        sets = {s: _torchvision_set(torchvision.datasets.STL10, root, split=s) for s in ("train+unlabeled", "test")}
        nhwc = {s: d.data.transpose(0, 2, 3, 1) for s, d in sets.items()}  # STL10 stores N x 3 x H x W
        pretrain = ImageSet(nhwc["train+unlabeled"])
        labeled = sets["train+unlabeled"].labels >= 0  # the 5,000 labeled images come first
        train = ImageSet(nhwc["train+unlabeled"][labeled], labels=sets["train+unlabeled"].labels[labeled])
        test, num_classes = ImageSet(nhwc["test"], labels=sets["test"].labels), 10
    elif name == "npz":
        pretrain, train, test, num_classes = _npz(root)
    elif name == "imagefolder":
        pretrain, train, test, num_classes = _image_folder(root, args.val_fraction)
    elif name == "packed":
        pretrain, train, test, num_classes = _packed(root)
    else:
        (x, y), (x_test, y_test) = (synthetic_images(n, args.image_size or 32, seed=s)
                                    for s, n in enumerate(args.synthetic_size))
        train, test = ImageSet(x, labels=y), ImageSet(x_test, labels=y_test)
        pretrain, num_classes = train, 10
    if len(pretrain) == 0:
        fail(f"the {name} training split in {root} holds no images")
    if test is not None and (len(train) == 0 or len(test) == 0):  # nothing to measure: as an unlabeled set
        train, test, num_classes = None, None, 0
    for s in (pretrain, train, test):
        if s is not None:
            s.seed = args.seed
    if args.image_size:
        image_size = args.image_size
    elif pretrain.images is not None:
        image_size = pretrain.images.shape[1]
    else:
        image_size = _typical_side(pretrain)
    mean, std = NORMALISATION.get(name) or _mean_std(pretrain.images)
    return Data(pretrain, train, test, num_classes, image_size, mean, std)


def fingerprint(*splits):
    """A short hash of labeled splits: their labels, and up to 256 images of each, spread over it (in
    memory: their pixels; files: their names, sizes and first and last 4 KB, not decoded). Two datasets
    of as many images tell apart by it (a probe resumes only on the data it was trained on); a folder
    moved or copied does not."""
    h = hashlib.sha256()
    for split in splits:
        h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        for i in sorted(set(np.linspace(0, len(split) - 1, min(len(split), 256)).round().astype(int))):
            if split.images is not None:
                h.update(np.ascontiguousarray(split.images[i]).tobytes())
            else:
                path = Path(split.files[i])
                h.update(f"{path.parent.name}/{path.name}".encode())
                try:  # uncompressed images (BMP, PPM) of one size have one file size: some bytes too
                    with open(path, "rb") as f:
                        h.update(f.read(4096))
                        f.seek(max(0, path.stat().st_size - 4096))
                        h.update(f.read(4096))
                except OSError:  # gone since the scan: the loader will say so
                    h.update(b"unreadable")
    return h.hexdigest()[:16]


def _typical_side(images):
    """An image folder's crop size: the median shorter side of up to 100 of its images, spread over the
    folder (headers only), up to 224. A folder of 32 px images trains at 32, and a stray thumbnail does
    not set the size of a folder of large images (as the first file's size did)."""
    sides = []
    for i in sorted(set(np.linspace(0, len(images.files) - 1, 100).round().astype(int))):
        path = images.files[i]
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except UNREADABLE:
            pass
    if not sides:  # none of them readable: the loader's own check names the folder's files
        try:
            sides.append(min(images.load(0)[0].size))
        except UnreadableImages as e:
            fail(str(e))
    return min(224, sorted(sides)[len(sides) // 2])


def _torchvision_set(cls, root, **kw):
    try:
        return cls(root, download=False, **kw)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        fail(f"{cls.__name__} not found in --data-dir {root} ({e}); run once with internet access to download it")


def _mean_std(images):
    """Per-channel mean and std of every k-th image (10,000 to 20,000 of them, all if fewer), summed
    a chunk at a time: all of them at once in float64 took 16 times their size (48 GB for 20,000
    packed images of 224 px)."""
    images = images[:: max(1, len(images) // 10_000)]
    step = max(1, 2**18 // (images[0].size // 3))  # images per chunk: 2^18 pixels, 6 MB in float64
    sums, n = np.zeros((2, 3)), len(images) * images[0].size // 3
    for i in range(0, len(images), step):
        x = images[i:i + step].reshape(-1, 3).astype(np.float64) / 255
        sums += x.sum(0), (x * x).sum(0)  # pixel values in [0, 1]: no cancellation in float64
    mean = sums[0] / n
    std = np.sqrt(np.maximum(sums[1] / n - mean**2, 0))
    return tuple(mean.round(4)), tuple(np.maximum(std, 1e-3).round(4))


def _npz(path):
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            fail(f"--data-dir {path} should be a .npz file or a folder holding exactly one (found {len(found)})")
        path = found[0]
    if not path.is_file():
        fail(f"--data-dir {path} does not exist; give the .npz file (MedMNIST layout: train_images, train_labels, ...)")
    try:
        with np.load(path) as f:
            arrays = dict(f)
    except Exception as e:  # not a zip of arrays, truncated, or arrays of Python objects
        fail(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); write it with numpy.savez")
    if "train_images" not in arrays:
        fail(f"{path} has no 'train_images' array (it has {sorted(arrays)}); expected the MedMNIST layout")

    def split(name):
        if f"{name}_images" not in arrays:
            return None
        x = arrays[f"{name}_images"]
        if x.dtype != np.uint8:
            fail(f"{path}: {name}_images is {x.dtype}; expected uint8 pixels 0-255")
        x = np.repeat(x[..., None], 3, axis=-1) if x.ndim == 3 else x  # grey -> 3 channels
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            fail(f"{path}: {name}_images has shape {x.shape}; expected N x H x W or N x H x W x 3")
        x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
        y = arrays.get(f"{name}_labels")
        # Multi-label sets (ChestMNIST: N x 14) have no single class: treated as unlabeled.
        y = None if y is None else y.reshape(len(y), -1)
        y = y[:, 0].astype(np.int64) if y is not None and y.shape[1] == 1 else None
        if y is not None and (len(y) != len(x) or (y < 0).any()):
            fail(f"{path}: {name}_labels should hold one class number 0, 1, ... per image ({len(x)} images, "
                 f"{len(y)} labels, {(y < 0).sum()} negative)")
        return ImageSet(np.ascontiguousarray(x), labels=y)

    train, test = split("train"), split("test") or split("val")
    if train.labels is None or test is None or test.labels is None:
        return train, None, None, 0
    return train, train, test, int(max(train.labels.max(), test.labels.max())) + 1


def _list_images(folder):
    """The image files under `folder`, sorted, hidden files and folders left out. Symbolic links to
    folders are followed, as torchvision's ImageFolder does, but a folder reached twice is read once,
    and a link to `folder` or a folder above it (which would loop, or bring in other classes) not."""
    found, seen, root = [], set(), os.path.realpath(folder)
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        # A link to the folder or above it (a class folder's "up -> ..") would bring in other classes' images
        if real in seen or seen and (root + os.sep).startswith(real + os.sep):
            dirs[:] = []
            continue
        seen.add(real)
        # Sorted, real folders before links: a folder reached twice is read where the same tree always puts it
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")),
                         key=lambda d: (os.path.islink(os.path.join(top, d)), d))
        found += [Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())  # not a broken link


def _scan(root):
    """(files, labels, classes) of a folder: class sub-folders, or a flat unlabeled folder."""
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file() and p.name[0] != "."):
        if any(p.is_dir() and p.name[0] != "." for p in root.iterdir()):
            print(f"warning: {root} holds images of its own, so its sub-folders are not classes: the set is "
                  "unlabeled (no kNN, no linear probe); move those images into the class folders if it has "
                  "classes", file=sys.stderr, flush=True)
        return _list_images(root), None, None
    files, labels, classes, empty = [], [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _list_images(d)
        if found:
            files += found
            labels += [len(classes)] * len(found)
            classes.append(d.name)
        else:
            empty.append(d.name)
    if empty and classes:  # torchvision's ImageFolder stops there; a class left out shifts the labels after it
        print(f"warning: {', '.join(empty)} in {root} hold{'s' if len(empty) == 1 else ''} no images: not a class "
              f"(the {len(classes)} classes are the folders with images)", file=sys.stderr, flush=True)
    return files, np.array(labels, dtype=np.int64), classes


def _image_folder(root, val_fraction):
    root = Path(root)
    if not root.is_dir():
        fail(f"--data-dir {root} is not a folder; give a folder of images (one sub-folder per class, or flat)")
    base = root / "train" if (root / "train").is_dir() else root
    held_out = next((root / s for s in ("val", "test") if (root / s).is_dir()), None) if base != root else None
    files, labels, classes = _scan(base)
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under --data-dir {root}")
    if labels is None or len(classes) == 1:  # unlabeled (or one dummy class): no kNN or linear probe
        return ImageSet(files=files), None, None, 0
    split = next((c for c in classes if c in ("val", "test") and any(p.is_dir() for p in (root / c).iterdir())), None)
    if base == root and split:  # DIR/val/<class>/ beside DIR/<class>/: its images would all be one class, "val"
        fail(f"{root / split} holds class folders beside the class folders of --data-dir {root}: to hold it out, "
             f"move the others into {root / 'train'} (DIR/train/<class>/ and DIR/{split}/<class>/)")
    if held_out:
        test_files, test_labels, test_classes = _scan(held_out)
        unknown = sorted(set(test_classes or []) - set(classes))
        if not test_files:
            fail(f"{held_out} holds no images ({', '.join(IMAGE_EXTENSIONS)}): put its images in the class "
                 f"sub-folders of {base}'s, or remove it to hold out --val-fraction of {base}")
        if test_labels is None:
            fail(f"{held_out} holds images of its own, not class sub-folders: sort them into sub-folders named as "
                 f"{base}'s ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        if unknown:
            fail(f"{held_out} has class folders that {base} has no images in: {', '.join(unknown)}; give each class "
                 f"training images (an empty folder is no class), or move those out of {held_out}")
        test_labels = np.array([classes.index(test_classes[t]) for t in test_labels])
        train = ImageSet(files=files, labels=labels, classes=classes)
        return train, train, ImageSet(files=test_files, labels=test_labels), len(classes)
    # No held-out folder: a deterministic split, the same in every script and every run.
    order = np.random.default_rng(0).permutation(len(files))
    n_val = int(round(val_fraction * len(files)))
    if not 0 < n_val < len(files):
        fail(f"--val-fraction {val_fraction} leaves no train or no val image out of {len(files)} in {root}")
    tr, va = order[n_val:], order[:n_val]
    train = ImageSet(files=[files[i] for i in tr], labels=labels[tr], classes=classes)
    return train, train, ImageSet(files=[files[i] for i in va], labels=labels[va]), len(classes)


def pack_image_folder(root, out, image_size, val_fraction=0.1):
    """Pack an image folder (any imagefolder layout) once into uint8 arrays, which `--dataset packed
    --data-dir OUT` reads with memory mapping: a custom small-image dataset then trains at memory
    speed, with the batched augmentation (in the spirit of `ketos compile`). Each image is resized
    (shorter side) and centre-cropped to image_size px. Unreadable files are reported by name and
    left out. Writes OUT/classes.json if labeled, then the arrays (test_*.npy if labeled, then
    train_labels.npy, train_images.npy last), each atomically: a pack cut short is not taken for a dataset."""
    pretrain, train, test, num_classes = _image_folder(root, val_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "classes.json"):
        (out / name).unlink(missing_ok=True)  # no file of an earlier pack is mixed with this one
    if num_classes:  # the names, in label order: label k is the k-th sub-folder, sorted
        (out / "classes.json").write_text(json.dumps({"num_classes": num_classes, "classes": train.classes}))
    resize = T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])
    bad = []
    for name, split in (("test", test), ("train", pretrain)):
        if split is None:
            continue
        images = np.lib.format.open_memmap(out / f"{name}_images.tmp.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(split.files), image_size, image_size, 3))
        keep = []
        for i, path in enumerate(split.files):
            try:
                with Image.open(path) as img:
                    images[len(keep)] = np.asarray(resize(to_rgb(img, path)))
                keep.append(i)
            except UNREADABLE as e:
                bad.append(path)
                print(f"warning: unreadable image {path} ({e}): left out", file=sys.stderr, flush=True)
        if keep and split.labels is not None:
            _save_npy(out / f"{name}_labels.npy", np.asarray(split.labels)[keep])
        if keep:
            _save_npy(out / f"{name}_images.npy", images[:len(keep)])
        del images
        os.remove(out / f"{name}_images.tmp.npy")
        if not keep:
            fail(f"none of the {len(split.files)} {name} images under {root} could be read: nothing packed")
        print(f"{name}: {len(keep)} images of {image_size} px", flush=True)
    return bad


def _save_npy(path, array):
    """np.save to a temporary file, then renamed: an interrupted pack leaves no half-written array."""
    with open(f"{path}.part", "wb") as f:
        np.save(f, array)
    os.replace(f"{path}.part", path)


def _packed(root):
    root = Path(root)
    if not (root / "train_images.npy").is_file():
        fail(f"--data-dir {root} holds no train_images.npy; make it with "
             f"python common.py pack --data-dir IMAGE_FOLDER --out {root} --image-size SIZE")

    def split(name):
        if not (root / f"{name}_images.npy").is_file():
            return None
        labels = root / f"{name}_labels.npy"
        try:
            return ImageSet(np.load(root / f"{name}_images.npy", mmap_mode="r"),  # read from disk as needed
                            labels=np.load(labels) if labels.is_file() else None)
        except (OSError, ValueError) as e:  # truncated or not an array file
            fail(f"the {name} arrays in --data-dir {root} are damaged ({e}); pack the image folder again")
    train, test = split("train"), split("test")
    if train.labels is None or test is None:
        return train, None, None, 0
    try:
        num_classes = json.loads((root / "classes.json").read_text())["num_classes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"--data-dir {root} has no readable classes.json ({type(e).__name__}); pack the image folder again")
    for name, s in (("train", train), ("test", test)):  # a pack mixed from two runs, or arrays edited by hand
        if len(s.labels) != len(s.images) or len(s.labels) and not 0 <= s.labels.min() <= s.labels.max() < num_classes:
            fail(f"the {name} labels in --data-dir {root} do not fit its images ({len(s.labels)} labels for "
                 f"{len(s.images)} images, {num_classes} classes); pack the image folder again")
    return train, train, test, num_classes


def synthetic_images(n, size=32, seed=0):
    """n images of 10 shape classes (disc, square, ring, cross, triangle, diamond, horizontal,
    vertical or diagonal stripes, checkerboard) in random colours, positions and sizes.

    Colour says nothing about the class, so an encoder must see shape to classify them: a
    randomly initialised network sorts them mostly by colour, a trained one by shape.
    Returns (uint8 images n x size x size x 3, int64 labels n).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = (rng.uniform(0.3, 0.7, (n, 1, 1)) for _ in range(2))
    r = rng.uniform(0.15, 0.3, (n, 1, 1))
    dx, dy = xx - cx, yy - cy
    freq, phase = rng.uniform(3, 6, (n, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 1, 1))
    d = np.sqrt(dx**2 + dy**2)
    masks = [
        d < r,
        np.maximum(abs(dx), abs(dy)) < r * 0.85,
        abs(d - r) < 0.05,
        ((abs(dx) < r / 3) & (abs(dy) < r)) | ((abs(dy) < r / 3) & (abs(dx) < r)),
        (dy < r * 0.7) & (abs(dx) < (dy + r) * 0.6),
        abs(dx) + abs(dy) < r,
        np.sin(2 * np.pi * freq * yy + phase) > 0,
        np.sin(2 * np.pi * freq * xx + phase) > 0,
        np.sin(2 * np.pi * freq * (xx + yy) / 1.4 + phase) > 0,
        (np.sin(2 * np.pi * freq * xx + phase) > 0) ^ (np.sin(2 * np.pi * freq * yy) > 0),
    ]
    mask = np.choose(labels[:, None, None], [np.broadcast_to(m, (n, size, size)) for m in masks])
    fg, bg = rng.integers(0, 256, (2, n, 1, 1, 3))
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


# ---- Augmentations -------------------------------------------------------------------------


def simclr_augmentation(image_size, mean, std, strength=0.5, blur_p=None):
    """One SimCLR view (Chen et al. 2020, appendix A): crop scale (0.08, 1), flip, colour jitter of
    strength s (0.8s/0.8s/0.8s/0.2s, p=0.8; the paper's CIFAR s is 0.5), grayscale p=0.2, Gaussian
    blur (sigma 0.1-2, p=blur_p; default: 0.5 above 64 px, none at 64 px or less: the paper drops it
    for CIFAR). Its kernel is 10% of the image; at 64 px or less 13 taps (+-3 sigma at sigma 2), as
    solo-learn's CIFAR views blur with PIL's GaussianBlur(radius=sigma), which is not cut off."""
    if blur_p is None:
        blur_p = 0.5 if image_size > 64 else 0.0
    kernel = image_size // 20 * 2 + 1 if image_size > 64 else min(13, 2 * image_size - 1)  # reflect padding < size
    blur = [T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p)] if blur_p else []
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *blur,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _view(size, scale, blur_p, solarize_p, blur, mean, std, min_kernel=1):
    """One view of the BYOL / DINO recipe: crop to `size` px with area `scale` (bilinear resize; the
    official BYOL and DINO code resize bicubic), flip, colour jitter 0.4/0.4/0.2/0.1 (p=0.8),
    grayscale p=0.2, Gaussian blur (sigma 0.1-2, p=blur_p; kernel 10% of the view, at least
    min_kernel taps) if `blur`, solarisation p=solarize_p."""
    kernel = min(max(size // 20 * 2 + 1, min_kernel), 2 * size - 1)  # reflect padding: less than the view's size
    blurs = [T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p)] if blur else []
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *blurs,
        T.RandomSolarize(128, p=solarize_p),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def byol_augmentations(image_size, mean, std):
    """BYOL's two asymmetric views (Grill et al. 2020, table 6), also used by Barlow Twins: crop
    scale (0.08, 1), flip, colour jitter 0.4/0.4/0.2/0.1 (p=0.8), grayscale p=0.2, Gaussian blur
    p=1.0 / 0.1 and solarisation p=0 / 0.2. At 64 px or less, no blur (solo-learn's CIFAR recipe)."""
    return [_view(image_size, (0.08, 1.0), blur_p, solarize_p, image_size > 64, mean, std)
            for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))]


def dino_augmentations(image_size, mean, std, local_crops, local_size, global_scale, local_scale):
    """DINO's multi-crop (Caron et al. 2021, section 3.1, appendix E): two global crops at
    image_size px with area global_scale, BYOL's asymmetric recipe (blur p=1.0 / 0.1, solarisation
    p=0 / 0.2), then `local_crops` small crops at local_size px with area local_scale (blur p=0.5).
    No blur at 64 px or less, as for BYOL on CIFAR. Global crops come first: the teacher sees them only.
    The official code blurs with PIL's GaussianBlur(radius=sigma), which is not cut off: the kernel
    has at least 13 taps (+-3 sigma at sigma 2), where 10% of a 96 px local crop (9 taps) would cut
    the blur of sigma 2 at 2 sigma and make it a narrower one."""
    blur = image_size > 64
    views = [_view(image_size, global_scale, 1.0, 0.0, blur, mean, std, 13),
             _view(image_size, global_scale, 0.1, 0.2, blur, mean, std, 13)]
    return views + [_view(local_size, local_scale, 0.5, 0.0, blur, mean, std, 13)] * local_crops


class Views:
    """Applies one transform per view: Views(t, t) for SimCLR, Views(t1, t2) for asymmetric ones."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def eval_transform(image_size, mean, std):
    """Deterministic: resize and centre-crop (the ImageNet 0.875 crop above 64 px)."""
    resize = image_size if image_size <= 64 else int(round(image_size / 0.875))
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def probe_transform(image_size, mean, std):
    """Linear-probe training: random-resized crop and flip (the standard protocol)."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


# ---- Batched augmentation on the training device -------------------------------------------


def _gray(x):
    """ITU-R 601 luma of float RGB images (B, 3, H, W) -> (B, 1, H, W), torchvision's weights
    (python numbers and in-place adds: no host-device copy, one new tensor)."""
    return x[:, 0:1].mul(0.2989).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


def _shift_hue(x, shift, out=None):
    """Rotate the hue of float RGB images by shift[b] turns, as RGB -> HSV, h + shift, HSV -> RGB.
    With v = max, c = max - min and the hue h6 in sixths of a turn, channel n (5, 3, 1 for R, G, B)
    is v - c clamp(min(k, 4 - k), 0, 1) with k = (n + h6) mod 6 (the alternative HSV formula, as
    v s = c): no saturation, no division by v. Written for the CPU as much as for the GPU: no
    comparisons, where() or % (several times slower than arithmetic there; the 0/1 masks come from
    ceil(v - channel)), and in-place ops on few buffers (each new large tensor costs page faults).
    out may be x itself: x is read only before out is written."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)  # elementwise: faster than amax over channels
    c = torch.minimum(torch.minimum(r, g), b).neg_().add_(v)  # max - min
    not_r, not_g = (v - r).ceil_(), (v - g).ceil_()  # v - channel is 0 where it is the maximum, else in (0, 1]
    is_b = not_r * not_g
    is_g, is_r = not_g.neg_().add_(1).mul_(not_r), not_r.neg_().add_(1)  # ties: red, then green, as torchvision
    # One mask is 1: h6 = g - b, b - r or r - g (adding the terms one by one is exact, the others are 0)
    h6 = (g - b).mul_(is_r).addcmul_(b, is_g).addcmul_(r, is_g, value=-1).addcmul_(r, is_b).addcmul_(g, is_b, value=-1)
    h6.div_(c.ceil().neg_().add_(1).add_(c))  # c = 0 (grey): any hue gives v, divide by 1
    h6.add_(is_g, alpha=2).add_(is_b, alpha=4).add_(6 * shift.view(-1, 1, 1))
    out, k, t = torch.empty_like(x) if out is None else out, is_r, is_g  # the masks' buffers, reused
    for ch, n in enumerate((5, 3, 1)):
        torch.add(h6, n, out=k)
        k.sub_(torch.div(k, 6, out=t).floor_(), alpha=6)  # k mod 6
        torch.minimum(k, torch.neg(k, out=t).add_(4), out=t).clamp_(0, 1)  # clamp(min(k, 4 - k), 0, 1)
        torch.addcmul(v, c, t, value=-1, out=out[:, ch])
    return out


class BatchedView:
    """One augmented view of a batch of uint8 images (B, H, W, 3), computed on the images' device
    with per-sample random parameters: the same distributions as the PIL pipeline it is made from
    (BatchedView.from_transform of simclr_augmentation's, _view's output). The ops follow
    torchvision's on float tensors: crop boxes as RandomResizedCrop.get_params (10 tries, then a
    central crop), bilinear resize of the box (no antialiasing when it shrinks), flip, colour jitter
    in a random order per sample, grayscale, Gaussian blur (reflect padding), solarisation of the
    pixels >= 128/255, normalisation. Random numbers come from the numpy Generator passed in, so a
    batch draws the same parameters on any device (its pixels then agree up to floating-point
    rounding: a GPU may blur in TF32). Returns a float tensor (B, 3, size, size).

    Speed: everything that depends only on the parameters (blend coefficients, which rows get the
    hue, grey, blur or solarisation) is worked out on the CPU and sent in two copies per pass, so the
    device never waits for the host; the costly ops run only on the rows that draw them."""

    def __init__(self, size, scale, ratio, mean, std, flip_p=0.0, jitter_p=0.0, jitter=(None,) * 4, gray_p=0.0,
                 blur_p=0.0, blur_kernel=0, blur_sigma=(0.1, 2.0), solarize_p=0.0):
        self.size, self.scale, self.ratio, self.mean, self.std = size, scale, ratio, mean, std
        self.flip_p, self.jitter_p, self.jitter, self.gray_p = flip_p, jitter_p, jitter, gray_p
        self.blur_p, self.blur_kernel, self.blur_sigma, self.solarize_p = blur_p, blur_kernel, blur_sigma, solarize_p

    @classmethod
    def from_transform(cls, compose):
        kw = {}
        for op in compose.transforms:
            p, inner = (op.p, op.transforms[0]) if isinstance(op, T.RandomApply) else (getattr(op, "p", 1.0), op)
            if isinstance(inner, T.RandomResizedCrop):
                kw.update(size=inner.size[0], scale=inner.scale, ratio=inner.ratio)
            elif isinstance(inner, T.RandomHorizontalFlip):
                kw["flip_p"] = p
            elif isinstance(inner, T.ColorJitter):
                kw.update(jitter_p=p, jitter=(inner.brightness, inner.contrast, inner.saturation, inner.hue))
            elif isinstance(inner, T.RandomGrayscale):
                kw["gray_p"] = p
            elif isinstance(inner, T.GaussianBlur):
                kw.update(blur_p=p, blur_kernel=inner.kernel_size[0], blur_sigma=inner.sigma)
            elif isinstance(inner, T.RandomSolarize) and inner.threshold == 128:
                kw["solarize_p"] = p
            elif isinstance(inner, T.Normalize):
                kw.update(mean=inner.mean, std=inner.std)
            elif not isinstance(inner, T.ToTensor):
                raise ValueError(f"no batched version of {inner}")
        return cls(**kw)

    def sample(self, n, height, width, rng):
        """The random parameters of n images, drawn on the CPU from the numpy Generator rng (numpy
        is several times faster than torch on such small arrays): a dict of arrays of length n."""
        u = rng.random
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u((n, 10)))
        log_r = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u((n, 10)))
        w, h = np.sqrt(area * aspect).round(), np.sqrt(area / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.argmax(1)  # the first try that fits, as torchvision
        w, h = w[np.arange(n), first], h[np.arange(n), first]
        found = ok.any(1)
        ratio_in = width / height  # otherwise: the whole image, cut to the ratio range
        fw = width if ratio_in <= self.ratio[1] else round(height * self.ratio[1])
        fh = height if ratio_in >= self.ratio[0] else round(width / self.ratio[0])
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        i = np.where(found, np.floor(u(n) * (height - h + 1)), (height - h) // 2)
        j = np.where(found, np.floor(u(n) * (width - w + 1)), (width - w) // 2)
        p = {"box": np.stack([i, j, h, w], 1), "flip": u(n) < self.flip_p}
        jit = u(n) < self.jitter_p
        factors = []
        for k, rng_k in enumerate(self.jitter):
            identity = 0.0 if k == 3 else 1.0
            f = identity if rng_k is None else rng_k[0] + (rng_k[1] - rng_k[0]) * u(n)
            factors.append(np.where(jit, f, identity))
        p["jitter"], p["order"] = np.stack(factors, 1), u((n, 4)).argsort(1)
        p["gray"] = u(n) < self.gray_p
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u(n)
        p["sigma"] = np.where(u(n) < self.blur_p, sigma, 0.0)  # 0: no blur
        p["solarize"] = u(n) < self.solarize_p
        return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in p.items()}

    def __call__(self, images, rng, rank=0, world_size=1):
        """One view of images (B, H, W, 3): BatchedView.many with this view alone."""
        return BatchedView.many([self], images, rng, rank, world_size)[0]

    def same_pass(self, other):
        """Whether two views can be made in one pass: the same output size, blur kernel,
        normalisation and hue setting (their probabilities and ranges are per-row parameters)."""
        return self._pass_key() == other._pass_key()

    def _pass_key(self):
        return self.size, self.blur_kernel, tuple(self.mean), tuple(self.std), self.jitter[3] is None

    @staticmethod
    def many(views, images, rng, rank=0, world_size=1):
        """Views that can be made in one pass (same_pass) of images, a process's share of a global
        batch: its rows rank, rank + world_size, ... (as EpochSampler deals them). The parameters
        are drawn for the global batch, view after view, and this share kept. Returns one tensor
        (B, 3, size, size) per view.

        The rows of all the views go through the ops together, so each op is called once for all
        of them (on a CPU, the cost of an op call is much of the cost of a small image). They are
        processed sorted by the jitter plan's group, so that every blend slot and the hue act on a
        contiguous run of rows (a view: no copy), and put back in order at the end."""
        n, view = len(images), views[0]
        ps = [v.sample(n * world_size, *images.shape[1:3], rng) for v in views]
        p = {k: np.concatenate([q[k][rank::world_size] for q in ps]) for k in ps[0]}
        coef, group = view.jitter_plan(p["jitter"], p["order"])
        perm = np.argsort(group, kind="stable")
        ends = np.searchsorted(group[perm], np.arange(1, 5)).tolist()  # where groups 0-3 end
        rows = [perm % n, np.argsort(perm), *(m[perm].nonzero()[0] for m in (p["gray"], p["sigma"] > 0, p["solarize"]))]
        floats = np.concatenate([p["box"], p["flip"][:, None], coef.reshape(-1, 18), p["jitter"][:, 3:],
                                 p["sigma"][:, None]], 1)[perm]
        floats = _to_device(torch.from_numpy(floats.astype(np.float32)), images.device)
        index = _to_device(torch.from_numpy(np.concatenate(rows)), images.device)
        box, flip, coef, shift, sigma = floats.split([4, 1, 18, 1, 1], 1)
        source, unsort, gray, blur, solarize = index.split([len(r) for r in rows])  # sizes known here: no sync
        x = view.crop(images.index_select(0, source).permute(0, 3, 1, 2).float().div_(255), box, flip[:, 0] > 0)
        view.jitter_sorted(x, coef.view(-1, 6, 3), shift[:, 0], ends, hue=view.jitter[3] is not None)
        if len(gray):
            x.index_copy_(0, gray, _gray(x.index_select(0, gray)).expand(-1, 3, -1, -1))
        if len(blur):
            x.index_copy_(0, blur, view.blur(x.index_select(0, blur), sigma[blur, 0]))
        if len(solarize):
            y = x.index_select(0, solarize)
            x.index_copy_(0, solarize, torch.where(y >= 128 / 255, 1 - y, y))
        for ch in range(3):  # python numbers: no constant tensor to copy to the device
            x[:, ch].sub_(view.mean[ch]).div_(view.std[ch])
        return list(x.index_select(0, unsort).split(n))

    def crop(self, x, box, flip):
        """Bilinear resize of box (top, left, height, width) to size x size, as torch's interpolate
        on the cropped image: source coordinate (k + 0.5) * height / size - 0.5, kept in the box."""
        height, width, s = x.shape[2], x.shape[3], self.size
        k = (torch.arange(s, device=x.device, dtype=torch.float32) + 0.5) / s
        ys = (box[:, :1] + (k * box[:, 2:3] - 0.5).clamp(min=0)).minimum(box[:, :1] + box[:, 2:3] - 1)
        xs = (box[:, 1:2] + (k * box[:, 3:4] - 0.5).clamp(min=0)).minimum(box[:, 1:2] + box[:, 3:4] - 1)
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        grid = torch.stack(torch.broadcast_tensors((xs * 2 / max(width - 1, 1) - 1)[:, None, :],
                                                   (ys * 2 / max(height - 1, 1) - 1)[:, :, None]), -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    @staticmethod
    def jitter_plan(factors, order):
        """Colour jitter as 6 blend slots around one hue rotation, worked out on the CPU (numpy)
        from the factors (brightness, contrast, saturation, hue) and the order of the 4 ops (n, 4).
        The hue, the costly op, then runs once on all the rows that draw it: each image's blends
        before its hue go, right-aligned, into slots 0-2, those after it, left-aligned, into slots
        3-5. A blend is x <- f x + a grey(x) + b mean(grey(x)) (torchvision's: brightness with black,
        contrast with the mean grey, saturation with the grey image); an unused slot has f = 1,
        a = b = 0, which leaves x exactly as it is. Returns the coefficients (n, 6, 3) and each row's
        group: 3 - the hue's position, or 4 for a row without jitter. Slot k < 3 is used by groups
        0..k, slot k >= 3 by groups k-2..3 and the hue by groups 0..3: sorted by group, each is a
        contiguous run of rows."""
        f = np.take_along_axis(factors, order, 1)
        blends = np.stack([f, (1 - f) * (order == 2), (1 - f) * (order == 1)], 2)  # (n, 4, 3), by position
        hue_at = (order == 3).argmax(1)
        position = hue_at[:, None] + np.array([-3, -2, -1, 1, 2, 3])  # the op each slot applies
        coef = np.take_along_axis(blends, position.clip(0, 3)[:, :, None], 1)
        coef = np.where(((position >= 0) & (position <= 3))[:, :, None], coef, np.array([1.0, 0.0, 0.0]))
        jittered = (factors != np.array([1.0, 1.0, 1.0, 0.0])).any(1)
        return coef, np.where(jittered, 3 - hue_at, 4)

    @staticmethod
    def jitter_sorted(x, coef, shift, ends, hue=True):
        """Colour jitter in place on rows sorted by group (ends: where groups 0-3 end): 6 slots of
        blends, each clamped to [0, 1], and the hue turned between slots 2 and 3."""
        for k in range(6):
            if k == 3 and hue:
                _shift_hue(x[:ends[3]], shift[:ends[3]], out=x[:ends[3]])
            rows = slice(0, ends[k]) if k < 3 else slice(ends[k - 3], ends[3])
            y, (f, a, b) = x[rows], (c.view(-1, 1, 1, 1) for c in coef[rows, k].unbind(1))
            gray = _gray(y)
            ref = gray.mean((2, 3), keepdim=True).mul_(b)  # first, as gray changes in place
            torch.addcmul(gray.mul_(a).add_(ref), y, f, out=y).clamp_(0, 1)  # f x + a grey + b mean
        return x

    @staticmethod
    def color_jitter(x, factors, order):
        """The colour jitter alone (a copy of x), parameters on the CPU: for tests and teaching."""
        coef, group = BatchedView.jitter_plan(factors.numpy(), order.numpy())
        perm = np.argsort(group, kind="stable")
        ends = np.searchsorted(group[perm], np.arange(1, 5)).tolist()
        y = BatchedView.jitter_sorted(x[perm], torch.from_numpy(coef[perm]).float(), factors[perm, 3], ends)
        return y[np.argsort(perm)]

    def blur(self, x, sigma):
        """Per-sample Gaussian blur with a kernel of blur_kernel taps (sigma 0: the identity)."""
        b, c, _, _ = x.shape
        k = self.blur_kernel
        t = torch.arange(k, device=x.device, dtype=torch.float32) - (k - 1) / 2
        kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6)[:, None]) ** 2)
        kernel = torch.where(sigma[:, None] > 0, kernel, (t == 0).float())
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one per channel
        x = F.pad(x.reshape(1, b * c, *x.shape[2:]), (k // 2,) * 4, mode="reflect")
        # b, the number of rows drawn for blurring, changes every step: were cuDNN to run these
        # convolutions with cudnn.benchmark on, it would time its algorithms again for each new b.
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        try:
            x = F.conv2d(x, kernel.view(b * c, 1, 1, k), groups=b * c)
            x = F.conv2d(x, kernel.view(b * c, 1, k, 1), groups=b * c)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        return x.view(b, c, *x.shape[2:])


def _to_device(t, device):
    """A CPU tensor to the device without making the host wait for the device (pinned memory, an
    asynchronous copy): a plain .to("cuda") waits for all the work queued on the GPU."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class DeviceLoader:
    """The training loader of the batched path: each step indexes its images straight from the
    uint8 array, with no worker processes (the array is copied to the GPU when under 2 GB, else read
    per batch, from a memory map for packed datasets), and the BatchedViews augment them on the
    training device, those of the same size in one pass (BatchedView.many). Same sampler and same
    output as the PIL loader, ([view, ...], labels), already on the training device.

    The random parameters of a step are drawn for the whole global batch from a generator seeded
    with (seed, epoch, batch), and each process keeps the rows of its own images: the views do not
    depend on the number of processes, and a run resumed mid-epoch draws the same ones."""

    def __init__(self, images, labels, views, local_batch, world_size, rank, seed, device):
        self.views, self.local_batch, self.seed, self.device = views, local_batch, seed, device
        self.groups = []  # the views made in one pass (SimCLR's two, DINO's global ones, its local ones)
        for i, view in enumerate(views):
            group = next((g for g in self.groups if views[g[0]].same_pass(view)), None)
            if group is None:
                self.groups.append([i])
            else:
                group.append(i)
        self.world_size, self.rank = world_size, rank
        self.sampler = EpochSampler(range(len(images)), world_size, rank, seed)
        on_device = device.type == "cuda" and images.nbytes < 2**31
        self.images = torch.from_numpy(np.array(images)).to(device) if on_device else images  # else numpy (mmap)
        self.labels = torch.as_tensor(labels if labels is not None else np.full(len(images), -1))

    def __len__(self):
        return len(self.sampler) // self.local_batch

    def __iter__(self):
        pairs = list(self.sampler)
        if not pairs:
            return
        epoch, first = pairs[0][0], self.sampler.skip // self.local_batch  # batches already done
        index = np.array([i for _, i in pairs])
        for b in range(len(self)):
            sel = index[b * self.local_batch:(b + 1) * self.local_batch]
            if torch.is_tensor(self.images):  # on the GPU already
                x = self.images.index_select(0, _to_device(torch.from_numpy(sel), self.device))
            else:  # a numpy array, memory-mapped or not: only these images are read
                x = _to_device(torch.from_numpy(self.images[sel]), self.device)
            rng, views = np.random.default_rng([self.seed, epoch, first + b]), {}
            for group in self.groups:
                views.update(zip(group, BatchedView.many([self.views[i] for i in group], x, rng, self.rank,
                                                         self.world_size)))
            labels = _to_device(self.labels[torch.from_numpy(sel)], self.device)  # linear_eval's targets
            yield [views[i] for i in range(len(self.views))], labels


# ---- Loader --------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (a permutation seeded by seed + epoch, this rank's share of it) that
    yields (epoch, index) pairs, and can skip the batches already done when resuming mid-epoch.

    Used with one process too (world_size 1): a 1-process run and a 2-process run with the same
    global batch then train on the same images in the same global batches, and a run can resume
    with another number of processes: after k steps, whatever the number of processes, the first
    k x batch images of the permutation are done. drop_last: no padding with repeated images, so
    an epoch is len(dataset) // batch steps for any number of processes.
    """

    def __init__(self, dataset, world_size, rank, seed):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip  # number of this rank's samples already trained on in this epoch

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


def quiet_worker(worker_id):
    """A loader process ignores the stop signals: SLURM (scancel, time limit, preemption) and Ctrl-C
    signal every process of the job, and torch's worker dies of SIGTERM, which would stop the main
    process mid-step with an error instead of letting it save. A SIGTERM from its parent still ends
    it (as torch's own handler does): the loader's shutdown, or Python's at exit, sends that one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux (SLURM's): who sent a SIGTERM is known only to sigwaitinfo
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # kept for the thread below
        parent = multiprocessing.parent_process()  # the loader's process (also when started by a forkserver)
        threading.Thread(target=_end_on_sigterm_from, args=(parent.pid if parent else os.getppid(),),
                         daemon=True).start()


def _end_on_sigterm_from(parent_pid):
    while signal.sigwaitinfo([signal.SIGTERM]).si_pid != parent_pid:
        pass
    os._exit(0)


def _seed_worker(worker_id):
    quiet_worker(worker_id)
    np.random.seed(torch.initial_seed() % 2**32)


def loader_context(workers):
    """How a DataLoader starts its loader processes: forked on Linux, as Python did by default before
    3.14 (forkserver since). Forked, they share the images in memory, a packed dataset's memory map
    too, which forkserver and spawn pickle in full to each of them (at every kNN, for its loader), and
    they need no helper processes: multiprocessing's resource tracker, which forkserver and spawn
    start, dies of the SIGUSR1 that SLURM sends to every process, and its replacement fills the log
    with tracebacks. None (torch's default) without loader processes or on other systems."""
    return "fork" if workers and sys.platform == "linux" else None


def train_loader(dataset, local_batch, world_size, rank, workers, seed, pin_memory):
    """Training loader: sharded, shuffled per epoch (call loader.sampler.set_epoch), last partial
    batch dropped, pinned memory for fast host-to-GPU copies, workers kept between epochs."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=EpochSampler(dataset, world_size, rank, seed),
        num_workers=workers, pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=loader_context(workers))


def _major_minor(version):
    """'0.18.1+cu121' -> (0, 18)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def pretrain_loader(dataset, transforms, local_batch, world_size, rank, args, device):
    """The loader of the pretraining views, and of linear_eval's augmented images: batched on the
    training device (BatchedView, DeviceLoader) where --aug-device allows it and the images are in
    memory, otherwise the PIL transforms in --workers worker processes (image folders)."""
    if args.aug_device == "cuda" and device.type != "cuda":
        fail("--aug-device cuda but training runs on the CPU; use --aug-device auto or cpu")
    batched = args.aug_device != "cpu" and dataset.images is not None
    if args.aug_device == "cuda" and not batched:
        fail(f"--aug-device cuda needs images held in memory, and --dataset {args.dataset} reads files; "
             "pack the folder (python common.py pack ...) or use --aug-device cpu")
    old_pair = _major_minor(torchvision.__version__) < (0, 19) and _major_minor(np.__version__) >= (2, 0)
    if not batched and old_pair and "ColorJitter" in repr(transforms):  # the probe's crops and flips work
        fail(f"torchvision {torchvision.__version__} predates numpy 2: its PIL colour jitter stops with an "
             f"OverflowError under numpy {np.__version__}; pip install 'numpy<2' (or torchvision >= 0.19)")
    if batched:
        return DeviceLoader(dataset.images, dataset.labels, [BatchedView.from_transform(t) for t in transforms],
                            local_batch, world_size, rank, args.seed, device)
    return train_loader(dataset.with_transform(Views(*transforms)), local_batch, world_size, rank, args.workers,
                        args.seed, pin_memory=device.type == "cuda")


if __name__ == "__main__":
    # python common.py pack --data-dir FOLDER --out PACKED --image-size 64 [--val-fraction 0.1]
    parser = argparse.ArgumentParser(description="pack an image folder into memory-mapped uint8 arrays")
    parser.add_argument("command", choices=["pack"], help="what to do")
    parser.add_argument("--data-dir", required=True, help="the image folder")
    parser.add_argument("--out", required=True, help="output folder, then given to --dataset packed --data-dir")
    parser.add_argument("--image-size", type=at_least(1), required=True,
                        help="side of the packed images in pixels (shorter side resized, centre square kept)")
    parser.add_argument("--val-fraction", type=fraction, default=0.1,
                        help="held out when there is no train/ and val/ (or test/)")
    a = parser.parse_args()
    try:
        skipped = pack_image_folder(a.data_dir, a.out, a.image_size, a.val_fraction)
    except OSError as e:  # not a folder, not writable, disk full: the arrays cannot be written
        fail(f"cannot write the packed arrays to --out {a.out} ({e.strerror or e}); give a writable folder with room")
    print(f"packed {a.data_dir} into {a.out}" + (f"; {len(skipped)} unreadable files left out" if skipped else ""))
