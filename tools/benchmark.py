"""Throughput of a method's training step, with and without its data pipeline, on this machine.

    python tools/benchmark.py --method simclr --arch resnet18 --image-size 32 --batch-size 64 --device cpu
    python tools/benchmark.py --method dino --arch vit_small --batch-size 256 --device cuda --json dino.json
    python tools/benchmark.py --method all --device cuda          # every method, one after the other
    python tools/benchmark.py --method dino --aug-only            # the augmentation alone: PIL vs batched

For each method it runs the script's own train_one_epoch on synthetic in-memory images and prints:
  model_only_img_s              the step alone: the views already on the device, the same batch each step
  end_to_end_cpu_loader_img_s   with the PIL pipeline in --workers loader processes (--aug-device cpu)
  end_to_end_device_aug_img_s   with batched augmentation on the training device (--aug-device auto)
  aug_pil_img_s                 the PIL loader alone (--workers processes)
  aug_batched_img_s             the batched augmentation alone, on the device (the two in turns)
  peak_mem_bytes                peak GPU memory allocated (on a CPU the process's peak RSS so far, loader
                                processes not included: with --method all, the largest up to that method)
and the ratio of each end-to-end figure to the model-only one. Images/s count images, not views.
--json FILE writes the figures (with --method all, one object per method, under its name).
"""
import argparse
import importlib
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

CLASSES = {"simclr": "SimCLR", "byol": "BYOL", "barlow": "BarlowTwins", "dino": "DINO"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n_images, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return n_images / (time.perf_counter() - t)


class NoSignal:
    def requested(self):
        return False


def setup(method, opts):
    """The method script's own pieces, as its main() builds them (one process)."""
    m = importlib.import_module(method)
    argv = ["--dataset", "synthetic", "--synthetic-size", str(opts.images), "10", "--image-size", str(opts.image_size),
            "--batch-size", str(opts.batch_size), "--arch", opts.arch, "--device", opts.device,
            "--workers", str(opts.workers), "--log-every", "1000000", "--precision", opts.precision, *opts.extra]
    args = m.get_args_parser().parse_args(argv)
    device = torch.device(opts.device)
    torch.backends.cudnn.benchmark = True  # as main() does: the fastest convolution algorithms
    amp_dtype = m.autocast_dtype(args, device)  # as main(): bf16, fp16 or fp32 by GPU generation
    if opts.data is None:  # the same synthetic images for every method: made once (25,000: 15 s here)
        opts.data = common.load_data(args)
    data = opts.data
    args.image_size = data.image_size
    if method == "dino":
        m.fill_recipe(args)
        views = common.dino_augmentations(data.image_size, data.mean, data.std, args.local_crops,
                                          args.local_crop_size, args.global_crops_scale, args.local_crops_scale)
    elif method == "simclr":
        views = [common.simclr_augmentation(data.image_size, data.mean, data.std, args.color_strength,
                                            args.blur_prob)] * 2
    else:
        views = common.byol_augmentations(data.image_size, data.mean, data.std)
    raw_model = getattr(m, CLASSES[method])(args, data.image_size).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    raw_model = raw_model.to(memory_format=memory_format)
    model = torch.compile(raw_model) if getattr(args, "compile", False) else raw_model
    optimizer = m.make_optimizer(raw_model.parameters(), args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = None
    if method == "dino":
        criterion = m.DINOLoss(args.out_dim, 2 + args.local_crops, args.warmup_teacher_temp, args.teacher_temp,
                               args.warmup_teacher_temp_epochs, args.student_temp, args.center_momentum).to(device)
    run = argparse.Namespace(device=device, amp_dtype=amp_dtype, memory_format=memory_format, is_main=True,
                             world_size=1, step=0, epoch=1, lr=0.0, n_row=0, n_epoch=0,
                             losses=torch.zeros(2, 2 if method == "dino" else 1, device=device),
                             base_lr=args.lr * args.batch_size / 256, total_steps=10**6, warmup_steps=0, end_step=10**9,
                             preemption=NoSignal())

    def train(loader):
        if method == "dino":
            m.train_one_epoch(model, raw_model, criterion, loader, optimizer, scaler, run, args)
        elif method == "byol":
            m.train_one_epoch(model, raw_model, loader, optimizer, scaler, run, args)
        else:
            m.train_one_epoch(model, loader, optimizer, scaler, run, args)

    return args, data, views, device, train


def pil_counts(opts):
    """Batches to skip and to time with the PIL loader. Its --workers processes have 2 batches each
    made ahead (DataLoader's prefetch) before the timing starts, and they finish theirs in bursts of
    --workers batches: skip the ones made ahead, time at least 4 bursts (16 workers, CPU defaults: 34 and 64)."""
    return opts.warmup + 2 * opts.workers, max(opts.steps, opts.aug_steps // opts.aug_rounds, 4 * opts.workers)


def bench(method, opts):
    args, data, views, device, train = setup(method, opts)
    b, steps = args.batch_size, opts.steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {}

    def loader(aug_device):
        args.aug_device = aug_device
        ld = common.pretrain_loader(data.pretrain, views, b, 1, 0, args, device)
        ld.sampler.set_epoch(0)
        return ld

    if not opts.aug_only:
        # The model alone: one batch of views made once, moved to the device, reused every step.
        first = next(iter(loader("auto")))
        fixed = [([v.contiguous() for v in first[0]], first[1])] * (opts.warmup + steps)
        train(fixed[:opts.warmup])
        out["model_only_img_s"] = timed(lambda: train(fixed[:steps]), b * steps, device)
        for key, aug_device in (("end_to_end_cpu_loader_img_s", "cpu"), ("end_to_end_device_aug_img_s", "auto")):
            skip, n = pil_counts(opts) if aug_device == "cpu" else (opts.warmup, steps)
            batches = iter(loader(aug_device))
            for _ in range(skip - opts.warmup):  # the batches made ahead while the loader started
                next(batches)
            train(itertools.islice(batches, opts.warmup))
            out[key] = timed(lambda: train(itertools.islice(batches, n)), b * n, device)  # no batch n+1
        del batches  # the device loader's copy of the images: not counted in the peak memory of the phase below
        out["end_to_end_cpu_loader_ratio"] = out["end_to_end_cpu_loader_img_s"] / out["model_only_img_s"]
        out["end_to_end_device_aug_ratio"] = out["end_to_end_device_aug_img_s"] / out["model_only_img_s"]
    # The augmentation alone, PIL and batched in turns (--aug-rounds): a machine whose speed drifts
    # (shared cores) then weighs on both alike. Each round starts a fresh loader, warmed up untimed.
    seconds, images = {"cpu": 0.0, "auto": 0.0}, {"cpu": 0, "auto": 0}
    for _ in range(opts.aug_rounds):
        for aug_device in seconds:
            skip, n = pil_counts(opts) if aug_device == "cpu" else (opts.warmup, -(-opts.aug_steps // opts.aug_rounds))
            it = iter(loader(aug_device))
            for _ in range(skip):
                next(it)
            sync(device)
            t = time.perf_counter()
            for _ in range(n):
                next(it)
            sync(device)
            seconds[aug_device] += time.perf_counter() - t
            images[aug_device] += b * n
            del it  # PIL: its loader processes stop before the batched turn
    out["aug_pil_img_s"], out["aug_batched_img_s"] = images["cpu"] / seconds["cpu"], images["auto"] / seconds["auto"]
    out["aug_batched_over_pil"] = out["aug_batched_img_s"] / out["aug_pil_img_s"]
    rss_unit = 1 if sys.platform == "darwin" else 1024  # getrusage's ru_maxrss: bytes on macOS, KiB on Linux
    out["peak_mem_bytes"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit)
    return out


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--method", default="simclr", choices=[*CLASSES, "all"],
                        help="method script to measure (default: simclr)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=32, help="image size in pixels (default: 32)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to measure (default: cuda if a GPU is visible, else cpu)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--workers", type=int, default=None, help="PIL loader processes (default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 10 on a CPU, "
                        "50 on a GPU, whose clock takes a while to rise)")
    parser.add_argument("--aug-steps", type=int, default=None,
                        help="timed batches per augmentation-only measurement (default: 30 on a CPU, 300 on a GPU)")
    parser.add_argument("--aug-rounds", type=int, default=3, help="augmentation-only turns of each")
    parser.add_argument("--aug-only", action="store_true", help="measure the augmentation alone, not the model")
    parser.add_argument("--warmup", type=common.at_least(0), default=None,
                        help="untimed steps before each measurement (default: 2 on a CPU, 10 on a GPU)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default: enough for the steps)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the method script")
    opts = parser.parse_args()
    gpu = opts.device == "cuda"
    for key, on_cpu, on_gpu in (("steps", 10, 50), ("aug_steps", 30, 300), ("warmup", 2, 10)):
        if getattr(opts, key) is None:  # 10 steps of ResNet-18 on 32 px images: well under a second on a GPU
            setattr(opts, key, on_gpu if gpu else on_cpu)
    opts.data = None
    if min(opts.steps, opts.aug_steps, opts.aug_rounds) < 1:
        parser.error("--steps, --aug-steps and --aug-rounds must be at least 1")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible to this process; use --device cpu or request a GPU")
    opts.extra = [a for a in opts.extra if a != "--"]
    own = [a for a in opts.extra if a.split("=")[0] in ("--arch", "--image-size", "--batch-size", "--device",
                                                        "--precision", "--workers", "--aug-device", "--dataset",
                                                        "--synthetic-size")]
    if own:
        flag = own[0].split("=")[0]
        parser.error(f"{flag} after --: give " + ("--images N" if flag == "--synthetic-size" else "it")
                     + " to the benchmark itself, before --")
    cpus = len(os.sched_getaffinity(0))
    opts.workers = cpus if opts.workers is None else opts.workers
    skip, n = pil_counts(opts)
    need = skip + max(n, opts.steps + opts.warmup, -(-opts.aug_steps // opts.aug_rounds) + opts.warmup) + 1
    if opts.images is not None and opts.images < opts.batch_size * need:
        parser.error(f"--images {opts.images} is too few: the measurements take {need} batches of "
                     f"{opts.batch_size}; give at least {opts.batch_size * need}, or leave it out")
    opts.images = opts.images or opts.batch_size * need
    if opts.json:  # fail now, not after the measurements
        try:
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            if Path(opts.json).is_dir():
                raise IsADirectoryError(21, "a folder")
        except OSError as e:
            parser.error(f"--json {opts.json}: cannot write a file there ({e.strerror or e}); give a file name")
    name = torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU, {cpus} cores"
    turns = f"{opts.aug_rounds} turn{'s' * (opts.aug_rounds > 1)}"
    timed = f"{opts.aug_steps} timed batches of each augmentation in {turns}"
    if not opts.aug_only:  # --aug-only runs no model step
        timed = f"{opts.arch}, {opts.steps} timed steps; {timed}"
    print(f"{name}; torch {torch.__version__}; {opts.image_size} px, batch {opts.batch_size}, {timed}, "
          f"PIL loader with {opts.workers} workers", flush=True)
    results = {}
    for method in (list(CLASSES) if opts.method == "all" else [opts.method]):
        r = results[method] = bench(method, opts)
        aug = (f"augmentation alone: PIL {r['aug_pil_img_s']:9.1f}, batched {r['aug_batched_img_s']:9.1f} "
               f"(x{r['aug_batched_over_pil']:.1f}) | peak memory {r['peak_mem_bytes'] / 2**20:.0f} MiB")
        if opts.aug_only:
            print(f"{method:7s} {aug}", flush=True)
            continue
        print(f"{method:7s} model only {r['model_only_img_s']:9.1f} img/s | end to end: PIL loader "
              f"{r['end_to_end_cpu_loader_img_s']:9.1f} ({r['end_to_end_cpu_loader_ratio']:.2f}), device aug "
              f"{r['end_to_end_device_aug_img_s']:9.1f} ({r['end_to_end_device_aug_ratio']:.2f}) | {aug}", flush=True)
    if opts.json:  # one method: its figures at the top level; --method all: one object per method
        meta = {"device": name, "arch": opts.arch, "image_size": opts.image_size, "batch_size": opts.batch_size,
                "torch": torch.__version__, "workers": opts.workers}
        figures = results[opts.method] if opts.method != "all" else results
        Path(opts.json).write_text(json.dumps({**meta, "method": opts.method, **figures}, indent=2))


if __name__ == "__main__":
    main()
