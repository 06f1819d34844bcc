"""Data loading and augmentation shared by simclr.py, linear_eval.py and the other method scripts.

Only data lives here: datasets, augmentations and the loader. Everything a reader needs to learn a
method (model, loss, optimiser, distributed training, checkpoints) is written out in the method
script itself.

Datasets (--dataset):
  cifar10, cifar100  torchvision, downloaded into --data-dir
  stl10              pretraining on train+unlabeled (105k images), evaluation on train/test
  imagefolder        any folder of images; class sub-folders give labels, a flat folder is unlabeled;
                     train/ and val/ (or test/) sub-folders are used when present
  npz                MedMNIST-style arrays: train_images, train_labels, val_*, test_*
  synthetic          10 procedurally drawn shape classes, made in memory in a second (tests, demos)

Small-image datasets are held in memory as uint8 arrays (N, H, W, 3); image folders are read
from disk in the loader's workers.

Every augmentation is seeded by (seed, epoch, image index), not by the worker that happens to
load the image: a run gives the same views whatever the number of workers or processes, and a
run resumed in the middle of an epoch sees exactly the views it would have seen.
"""
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "npz", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Per-channel mean and std of the training images; datasets not listed compute theirs.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


def add_data_args(parser):
    """The data flags, identical in every script."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, help="which dataset")
    g.add_argument("--data-dir", default="./data",
                   help="dataset folder (download target for cifar/stl10, image folder, or .npz file)")
    g.add_argument("--image-size", type=int, default=None,
                   help="crop size in pixels (default: native size; 224 for imagefolder)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="imagefolder without train/ and val/: fraction held out for evaluation")
    g.add_argument("--synthetic-size", type=int, nargs=2, default=[2000, 500], metavar=("TRAIN", "TEST"),
                   help="number of synthetic train and test images")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    g.add_argument("--workers", type=int, default=min(8, cpus),
                   help="data-loading processes per training process")
    return g


# ---- Datasets ------------------------------------------------------------------------------


class ImageSet(torch.utils.data.Dataset):
    """Images in memory (uint8 array N x H x W x 3) or as files, with labels or without (None).

    Indexed by an int, or by (epoch, index) as EpochSampler yields: the transform's random
    numbers are then drawn from a generator seeded with (seed, epoch, index).
    """

    def __init__(self, images=None, files=None, labels=None, transform=None, seed=0):
        self.images, self.files, self.labels = images, files, labels
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
        for j in range(min(len(self.files), 100)):
            path = self.files[(i + j) % len(self.files)]
            try:
                with Image.open(path) as img:
                    return img.convert("RGB"), (i + j) % len(self.files)
            except (OSError, ValueError, SyntaxError) as e:
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({e}); delete or replace it "
                          f"({len(self._warned)} skipped in this process)", file=sys.stderr, flush=True)
        raise RuntimeError(f"100 unreadable images in a row near {self.files[i]}: check the image folder")

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


def download_data(args):
    """Download cifar/stl10 into --data-dir (call on rank 0 only, before load_data)."""
    cls = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}.get(args.dataset)
    if cls is None:
        return
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
    else:
        (x, y), (x_test, y_test) = (synthetic_images(n, args.image_size or 32, seed=s)
                                    for s, n in enumerate(args.synthetic_size))
        train, test = ImageSet(x, labels=y), ImageSet(x_test, labels=y_test)
        pretrain, num_classes = train, 10
    if len(pretrain) == 0:
        fail(f"the {name} training split in {root} holds no images")
    for s in (pretrain, train, test):
        if s is not None:
            s.seed = args.seed
    if args.image_size:
        image_size = args.image_size
    elif pretrain.images is not None:
        image_size = pretrain.images.shape[1]
    else:  # an image folder: its first image's size, up to 224 (so a folder of 32 px images trains at 32)
        image_size = min(224, *pretrain.load(0)[0].size)
    mean, std = NORMALISATION.get(name) or _mean_std(pretrain.images)
    return Data(pretrain, train, test, num_classes, image_size, mean, std)


def _torchvision_set(cls, root, **kw):
    try:
        return cls(root, download=False, **kw)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        fail(f"{cls.__name__} not found in --data-dir {root} ({e}); run once with internet access to download it")


def _mean_std(images):
    x = images[:: max(1, len(images) // 10_000)].reshape(-1, 3).astype(np.float64) / 255
    return tuple(x.mean(0).round(4)), tuple(np.maximum(x.std(0), 1e-3).round(4))


def _npz(path):
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            fail(f"--data-dir {path} should be a .npz file or a folder holding exactly one (found {len(found)})")
        path = found[0]
    if not path.is_file():
        fail(f"--data-dir {path} does not exist; give the .npz file (MedMNIST layout: train_images, train_labels, ...)")
    with np.load(path) as f:
        arrays = dict(f)
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
        return ImageSet(np.ascontiguousarray(x), labels=y)

    train, test = split("train"), split("test") or split("val")
    if train.labels is None or test is None or test.labels is None:
        return train, None, None, 0
    return train, train, test, int(max(train.labels.max(), test.labels.max())) + 1


def _list_images(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan(root):
    """(files, labels, classes) of a folder: class sub-folders, or a flat unlabeled folder."""
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file() and p.name[0] != "."):
        return _list_images(root), None, None
    files, labels, classes = [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _list_images(d)
        if found:
            files += found
            labels += [len(classes)] * len(found)
            classes.append(d.name)
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
    if labels is None:  # unlabeled: train on everything, no kNN or linear probe
        return ImageSet(files=files), None, None, 0
    if held_out:
        test_files, test_labels, test_classes = _scan(held_out)
        unknown = set(test_classes or []) - set(classes)
        if test_labels is None or unknown or not test_files:
            fail(f"{held_out} must hold the same class sub-folders as {base} (unknown: {sorted(unknown)})")
        test_labels = np.array([classes.index(test_classes[t]) for t in test_labels])
        train = ImageSet(files=files, labels=labels)
        return train, train, ImageSet(files=test_files, labels=test_labels), len(classes)
    # No held-out folder: a deterministic split, the same in every script and every run.
    order = np.random.default_rng(0).permutation(len(files))
    n_val = int(round(val_fraction * len(files)))
    if not 0 < n_val < len(files):
        fail(f"--val-fraction {val_fraction} leaves no train or no val image out of {len(files)} in {root}")
    tr, va = order[n_val:], order[:n_val]
    train = ImageSet(files=[files[i] for i in tr], labels=labels[tr])
    return train, train, ImageSet(files=[files[i] for i in va], labels=labels[va]), len(classes)


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


def simclr_augmentation(image_size, mean, std):
    """One SimCLR view (Chen et al. 2020, appendix A): crop scale (0.08, 1), flip, colour jitter of
    strength 0.5 (0.4/0.4/0.4/0.1, p=0.8), grayscale p=0.2, and Gaussian blur (p=0.5, kernel 10%
    of the image, sigma 0.1-2) only above 64 px: the paper drops blur for CIFAR."""
    blur = []
    if image_size > 64:
        blur = [T.RandomApply([T.GaussianBlur(image_size // 20 * 2 + 1, sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *blur,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _view(size, scale, blur_p, solarize_p, blur, mean, std):
    """One view of the BYOL / DINO recipe: crop to `size` px with area `scale`, flip, colour jitter
    0.4/0.4/0.2/0.1 (p=0.8), grayscale p=0.2, Gaussian blur (sigma 0.1-2, p=blur_p) if `blur`,
    solarisation p=solarize_p."""
    blurs = [T.RandomApply([T.GaussianBlur(size // 20 * 2 + 1, sigma=(0.1, 2.0))], p=blur_p)] if blur else []
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
    """DINO's multi-crop (Caron et al. 2021, section 3.1, appendix D): two global crops at
    image_size px with area global_scale, BYOL's asymmetric recipe (blur p=1.0 / 0.1, solarisation
    p=0 / 0.2), then `local_crops` small crops at local_size px with area local_scale (blur p=0.5).
    No blur at 64 px or less, as for BYOL on CIFAR. Global crops come first: the teacher sees them only."""
    blur = image_size > 64
    views = [_view(image_size, global_scale, 1.0, 0.0, blur, mean, std),
             _view(image_size, global_scale, 0.1, 0.2, blur, mean, std)]
    return views + [_view(local_size, local_scale, 0.5, 0.0, blur, mean, std)] * local_crops


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


def _seed_worker(worker_id):
    np.random.seed(torch.initial_seed() % 2**32)


def train_loader(dataset, local_batch, world_size, rank, workers, seed, pin_memory):
    """Training loader: sharded, shuffled per epoch (call loader.sampler.set_epoch), last partial
    batch dropped, pinned memory for fast host-to-GPU copies, workers kept between epochs."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=EpochSampler(dataset, world_size, rank, seed),
        num_workers=workers, pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed))
