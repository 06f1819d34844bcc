"""Linear evaluation of a self-supervised backbone: linear probe, fast probe on frozen features, kNN.

Works on last.pt or backbone.pt of every method script (they share the checkpoint layout): the
backbone is rebuilt from the metadata stored with it and loaded with weights_only=True.

Launch:
    python linear_eval.py --ckpt runs/simclr/last.pt               # dataset and image size from the checkpoint
    python linear_eval.py --ckpt runs/simclr/backbone.pt --mode fast
    python linear_eval.py --ckpt random --dataset cifar10          # baseline: a randomly initialised backbone
    torchrun --nproc_per_node=4 linear_eval.py --ckpt runs/simclr/last.pt
    sbatch sbatch/linear_eval.sh --ckpt runs/simclr-1234/last.pt
Results go to <output-dir>/results.json (default: linear_eval/ beside the checkpoint, linear_eval_fast/
with --mode fast; runs/linear_eval_random_<dataset>_<arch>[_fast] for --ckpt random);
starting the same command again resumes the probe from <output-dir>/last.pt.

Protocol (--mode linear, the standard one): frozen backbone in eval mode, BatchNorm without affine
parameters then a linear layer (MAE's probe), trained with SGD (momentum 0.9, lr 0.1 x batch/256,
no weight decay, cosine, 100 epochs, batch 256) on random-resized crops and flips; top-1 and top-5
on the test split with centre crops.
--mode fast computes the features of the un-augmented training images once and trains the linear
layer on them: minutes instead of hours, usually a little below the full protocol.
kNN: weighted, k=200, temperature 0.1, on L2-normalised features (as lightly's benchmarks).
Features: a ResNet's pooled output, a ViT's final CLS token (DINO's eval_linear.py concatenates the
CLS tokens of the last 4 blocks for ViT-S, so its ViT figures are not directly comparable).

Reading order: the evaluation is in Arguments and Training (about 455 lines). The blocks
marked `# SHARED: identical in every script` (backbone, LARS and schedules, distributed setup,
gathers with gradients and global BatchNorm, checkpoints, logging, preemption, kNN monitor;
about 715 lines) are the same in every script: read them once, in any of them.
"""
import argparse
import csv
import datetime
import functools
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision

import common


# ---- Arguments -----------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("Linear evaluation", description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    # --dataset --data-dir --image-size --val-fraction --synthetic-size --workers --aug-device
    g = common.add_data_args(parser, "the checkpoint's, with --ckpt random the images' own size")
    # None: the checkpoint's pretraining values (the same data and split), or else the usual defaults
    parser.set_defaults(dataset=None, data_dir=None, val_fraction=None, synthetic_size=None)
    g.description = ("--dataset, --data-dir, --image-size, --val-fraction, --synthetic-size: when not given, the "
                     "checkpoint's (the same images, size and split as in pretraining), with --ckpt random the method "
                     "scripts' defaults")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--ckpt", required=True, help="last.pt or backbone.pt of any method script, or 'random'")
    g.add_argument("--arch", default=None, choices=ARCHS, help="backbone of --ckpt random (default: resnet18)")
    g.add_argument("--patch-size", type=common.at_least(1), default=None,
                   help="ViT patch size of --ckpt random (default: 4 up to 32 px, 8 up to 64 px, else 16)")
    g.add_argument("--mode", default="linear", choices=["linear", "fast"],
                   help="linear: probe on augmented images; fast: probe on features computed once")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.at_least(1), default=100, help="training epochs of the linear layer")
    g.add_argument("--batch-size", type=common.at_least(2), default=256, help="global batch size, over all processes")
    g.add_argument("--optimizer", default="sgd", choices=["lars", "sgd", "adamw"], help="optimizer")
    g.add_argument("--lr", type=common.at_least(0, float, high=1e4), default=0.1,
                   help="learning rate for a batch of 256 (scaled by batch/256)")
    g.add_argument("--weight-decay", type=common.at_least(0, float, high=1e4), default=0.0,
                   help="weight decay (not on the bias)")
    g.add_argument("--lars-eta", type=common.positive, default=0.02, help="LARS trust coefficient")
    g.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="LARS layer rate min(trust ratio, lr), solo-learn's clip_lr (--no-lars-clip: ratio x lr)")
    g.add_argument("--warmup-epochs", type=common.at_least(0), default=0,
                   help="linear warm-up epochs before the cosine decay")
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="results and probe checkpoints (default: linear_eval[_fast]/ beside --ckpt; "
                        "runs/linear_eval_random_<dataset>_<arch>[_fast] for --ckpt random)")
    g.add_argument("--resume", default=None, help="probe checkpoint to start from when --output-dir has no last.pt")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision of the frozen backbone (auto: bf16 on Ampere+ GPUs, fp16 on V100/T4, "
                        "else fp32); its features and the linear layer are fp32")
    g.add_argument("--seed", type=common.at_least(0, high=2**32 - 1), default=0, help="random seed")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on CPU)")
    g.add_argument("--save-every", type=common.at_least(1), default=1, help="write last.pt every N epochs")
    g.add_argument("--log-every", type=common.at_least(1), default=50, help="log and print every N steps")
    g.add_argument("--knn-every", type=common.at_least(0), default=1, help="kNN evaluation at the end (0 = skip)")
    g.add_argument("--max-steps", type=common.at_least(1), default=None, help="stop after N optimisation steps in all")
    return parser


# ---- Backbone ------------------------------------------------------------------------------
# SHARED: identical in every script

VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
             "vit_large": (1024, 24, 16)}  # width, depth, attention heads (DeiT / ViT papers)
ARCHS = ("resnet18", "resnet34", "resnet50", *VIT_SIZES)


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for a random subset of the
    samples and scale the kept ones by 1 / (1 - p), so that the expected output is unchanged."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.heads, self.drop_path = heads, drop_path
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d / heads)) v, per head: the scale is that of one head's width
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + drop_path(self.proj(attn), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as in DINO's vision_transformer.py: non-overlapping patches
    become tokens, a CLS token is prepended, learned position embeddings are added, pre-norm blocks
    follow; the output is the final CLS token. Drop path rises linearly with depth from 0."""

    def __init__(self, image_size, patch_size, dim, depth, heads, drop_path=0.0):
        super().__init__()
        self.grad_checkpointing = False  # set True to recompute each block in the backward pass
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path * i / max(1, depth - 1)) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embeddings(self, h, w):
        """The learned grid of position embeddings, resized (bicubic) for an input with another
        number of patches: global and local crops go through the same network (DINO, section 3.1)."""
        n = math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (n, n):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        x = self.patch_embed(x)  # batch, dim, h, w: one token per patch
        pos = self.position_embeddings(*x.shape[2:])
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x.flatten(2).transpose(1, 2)], 1) + pos
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed during backward
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)[:, 0]


def default_patch_size(image_size):
    """4 px ViT patches up to 32 px images, 8 up to 64 px, else 16 (ViT-S/16 on 224 px: 196 tokens;
    a 32 px image needs small patches to give more than a handful)."""
    return 4 if image_size <= 32 else 8 if image_size <= 64 else 16


def build_backbone(arch, image_size, patch_size=None, drop_path=0.0):
    """The backbone without a classifier, and its metadata (arch, image_size, feat_dim, and
    cifar_stem or patch_size), which checkpoints store so that linear_eval.py can rebuild it.

    ResNets (torchvision) get the CIFAR stem at 64 px or less: a 3x3 stride-1 first convolution and
    no max-pool (SimCLR paper, appendix B.9), as the ImageNet stem would shrink 32 px to 8 px at once.
    Its padding is 1 ("SAME", as SimCLR's code): 32 px maps stay 32 px (solo-learn pads 2: 34 px).
    ViTs take default_patch_size(image_size) unless told; the image size must be a multiple of it.
    """
    meta = {"arch": arch, "image_size": image_size}
    if arch in VIT_SIZES:
        patch_size = patch_size or default_patch_size(image_size)
        if image_size % patch_size:  # the convolution would silently drop the last rows and columns
            common.fail(f"--image-size {image_size} is not a multiple of the ViT patch size {patch_size}; change "
                        "either (--patch-size, --image-size)")
        dim, depth, heads = VIT_SIZES[arch]
        net = VisionTransformer(image_size, patch_size, dim, depth, heads, drop_path)
        return net, dict(meta, patch_size=patch_size, feat_dim=dim)
    if patch_size is not None:  # it would be ignored, yet recorded in args.json
        common.fail(f"--patch-size applies to ViT backbones, not {arch}; drop it or use --arch vit_*")
    net = getattr(torchvision.models, arch)()
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dict(meta, cifar_stem=image_size <= 64, feat_dim=feat_dim)


# ---- Optimizer: LARS and schedules ---------------------------------------------------------
# SHARED: identical in every script


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in solo-learn, whose CIFAR recipes (eta 0.02, lr 0.3-1.0) are the
    scripts' defaults. For each weight matrix, with the trust ratio
    r = eta * ||w|| / (||g|| + wd * ||w||), the update g + wd * w goes to SGD momentum with the layer
    learning rate min(r, lr) (clip=True: solo-learn's clip_lr, --lars-clip's default) or r * lr
    (clip=False: Lightning Bolts' LARS; the official Barlow Twins and BYOL code, with eta 0.001,
    divide by ||g + wd * w|| instead). Parameters with one dimension (biases, norm weights) get
    neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(update)
                    ratio = g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm)
                    if g.get("clip") and g["lr"] > 0:  # lr * ratio becomes min(r, lr); no "clip": older checkpoints
                        ratio = (ratio / g["lr"]).clamp(max=1.0)
                    # A zero weight or gradient gets neither weight decay nor the ratio, as in solo-learn
                    # (torch.where rather than an `if`: no read-back of the norms to the host).
                    update = torch.where((w_norm > 0) & (g_norm > 0), update.add(p, alpha=g["weight_decay"]) * ratio,
                                         update)
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
                mu = self.state[p]["mu"]
                mu.mul_(g["momentum"]).add_(update)
                p.add_(mu, alpha=-g["lr"])


def make_optimizer(params, args):
    """--optimizer lars|sgd|adamw. Every step, each group's lr is the scheduled lr times its
    "lr_scale". Biases and norm weights (1-D) get no weight decay with any optimizer, and their own
    learning rate where the script has --lr-biases (the Barlow Twins paper's implementation details)."""
    params = [p for p in params if p.requires_grad]
    bias_scale = 1.0
    if getattr(args, "lr_biases", None) is not None:  # scheduled like the weights' lr, so a fraction of it
        if args.lr == 0:
            common.fail("--lr-biases needs a --lr above 0 (the biases follow the same schedule, scaled)")
        bias_scale = args.lr_biases / args.lr
    groups = [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": bias_scale}]
    if args.optimizer == "lars":
        return LARS(groups, lr=0.0, weight_decay=args.weight_decay, eta=args.lars_eta, clip=args.lars_clip)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=args.weight_decay)


def load_optimizer_state(optimizer, state):
    """torch's load_state_dict also restores each group's settings. The learning-rate scales are
    set again from the command line, as --lr is (the other settings are checked unchanged on resume)."""
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, scale in zip(optimizer.param_groups, scales):
        g["lr_scale"] = scale


def cosine_schedule(step, total_steps, warmup_steps, base, final=0.0):
    """Linear warm-up to `base` over warmup_steps, then cosine decay to `final` at total_steps."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---- Distributed setup ---------------------------------------------------------------------
# SHARED: identical in every script


def first_host(nodelist):
    """First host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    prefix, _, ranges = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist).group(0).partition("[")
    return prefix + ranges.split(",")[0].split("-")[0].rstrip("]")


def setup_distributed(args):
    """Start torch.distributed from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) or, inside an `srun` step, from SLURM's (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID; master = first host of the step, port derived from the job and step ids); otherwise
    run as a single process. nccl on GPUs, gloo on CPUs. Returns (rank, local_rank, world_size, device).
    The global --batch-size is checked first, so that a bad one never leaves a process waiting."""
    env = os.environ
    rank, local_rank, world_size = 0, 0, 1
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, local_rank, world_size = int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
        elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # an srun step (the batch shell has no step id)
            rank, local_rank, world_size = (int(env[k]) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
            # Rank 0 runs on the step's first node; steps of one job running side by side get other ports.
            env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST", env["SLURM_JOB_NODELIST"])))
            port = 15000 + (int(env["SLURM_JOB_ID"]) + 1000 * int(env["SLURM_STEP_ID"])) % 20000
            env.setdefault("MASTER_PORT", str(port))
            torch.set_num_threads(int(env.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))  # no oversubscription
        elif "RANK" in env or int(env.get("WORLD_SIZE", 1)) > 1:  # half of torchrun's pair: each would train alone
            raise KeyError("WORLD_SIZE" if "RANK" in env else "RANK")
        elif int(env.get("SLURM_NTASKS", 1)) > 1:
            print(f"warning: this SLURM job has {env['SLURM_NTASKS']} tasks but this process was not started by "
                  "srun: training as a single process (start it with `srun python ...`)", file=sys.stderr)
    except (KeyError, ValueError) as e:  # a variable missing or not a number: say which, no traceback
        what = f"{e} is not set" if isinstance(e, KeyError) else f"a variable is not a number: {e}"
        common.fail(f"cannot start the processes from the launcher's variables ({what}); start with torchrun or "
                    "srun, or unset RANK and SLURM_STEP_ID to run as one process")
    if args.batch_size % world_size:
        common.fail(f"--batch-size {args.batch_size} (global) is not divisible by the {world_size} processes")
    device_arg = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda but no GPU is visible to this process; use --device cpu or request a GPU")
    device = torch.device("cpu")
    if device_arg == "cuda":
        # torchrun's processes all see the node's GPUs: a local rank past them would share one, and NCCL stop at the
        # first collective. SLURM (or a launcher) may show each process its own GPUs: one, or its socket's; there
        # the rank wraps around them.
        count, torchrun = torch.cuda.device_count(), "TORCHELASTIC_RUN_ID" in env  # set by torchrun, for its processes
        if "RANK" in env and "WORLD_SIZE" in env and (count > 1 or torchrun) and count <= local_rank:
            common.fail(f"process {local_rank} of this node has no GPU of its own ({count} GPU(s) visible): start "
                        "one process per GPU (--nproc_per_node, or --ntasks-per-node equal to --gpus-per-node)")
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
    if world_size > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= env.keys():  # init_process_group needs both
        common.fail("cannot start the processes from the launcher's variables (MASTER_ADDR or MASTER_PORT is not "
                    "set); start with torchrun or srun, or unset RANK and SLURM_STEP_ID to run as one process")
    if world_size > 1:
        # The other processes wait for rank 0's dataset download (STL-10: 2.6 GB) in their first collective: 30
        # minutes for it, gloo's default, where NCCL's (10 minutes) would end the job with a store timeout.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
    return rank, local_rank, world_size, device


def autocast_dtype(args, device):
    """The autocast dtype of --precision (None: fp32). auto: bf16 on GPUs that compute in it
    (Ampere and newer), fp16 with loss scaling on Volta and Turing (tensor cores but no bf16: V100,
    T4), fp32 on older GPUs and CPUs. args.precision becomes the choice, as saved in checkpoints."""
    if args.precision == "auto":
        major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
        args.precision = "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]


def cleanup_distributed():
    """Wait for every process, then close the group: leaving with a live group, or closing it
    while another process still uses it, can abort the process at exit."""
    if dist.is_initialized():
        dist.barrier()
        if torch.__version__ < "2.8":
            # torch < 2.8 closes a group holding the GIL and waits for its threads, which may still need the GIL to
            # free the tensors of the last collectives (the kNN's features): the job then hangs (torch 2.3, gloo, 2
            # busy cores: 13 of 74 closes after an all_gather). Half a second without the GIL lets them finish first.
            time.sleep(0.5)
        dist.destroy_process_group()


def wait_for_rank0(world_size, group=None):
    """The barrier after what rank 0 does alone at the start (output folder, download). If rank 0
    stopped there, its one error line says why; the others then end with one line, not a traceback.
    On GPUs it waits in Preemption's gloo group: NCCL forms its connections at its first call, and a
    failure there (two processes on one GPU, the network) must not pass for process 0's end."""
    if world_size > 1:
        try:
            dist.barrier(group=group)
        except RuntimeError:  # a process is gone, and its end of the connection with it
            rank = dist.get_rank()
            gone = "process 0 is gone" if rank else "another process is gone"
            raise SystemExit(f"error: process {rank} stops: {gone} (its error is above)") from None


# ---- Distributed: gather with gradients, global BatchNorm ---------------------------------
# SHARED: identical in every script


class GatherWithGrad(torch.autograd.Function):
    """all_gather that lets gradients flow back: every process's loss depends on every process's
    embeddings, so each one receives the sum over processes of the gradient of its own slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (torch's runs on GPUs only): the statistics of the global
    batch, from every process's count, per-channel means and sums of squared deviations, gathered
    with gradients."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, c, shape = [0] + list(range(2, x.dim())), x.shape[1], (1, x.shape[1]) + (1,) * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 (autocast): statistics in fp32
        # Each process's count, mean and sum of squared deviations from its mean, combined with the
        # parallel variance formula (Chan et al., as torch's SyncBatchNorm): sums of squares, E[x^2] -
        # mean^2, cancel when a channel's mean is large against its spread (NaN at a ratio of 10^4).
        mean_i = xf.mean(dims)
        local = [torch.full((1,), x.numel() / c, dtype=xf.dtype), mean_i, (xf - mean_i.view(shape)).square().sum(dims)]
        counts, means, m2s = GatherWithGrad.apply(torch.cat(local)[None]).split([1, c, c], dim=1)
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(x.dtype)  # the input's dtype, as torch's BatchNorm under autocast


def convert_sync_batchnorm(module, device):
    """BatchNorm over the global batch under DDP ("global BN", SimCLR paper, section 2); the state
    dict keys do not change, so checkpoints load with or without it."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.running_mean)  # same dtype, device
            sync.load_state_dict(child.state_dict())
            if child.affine:  # the same parameters, as torch's converter: a frozen one stays frozen
                sync.weight, sync.bias = child.weight, child.bias
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module


# ---- Checkpoints ---------------------------------------------------------------------------
# SHARED: identical in every script


def save_checkpoint(obj, path):
    """Write atomically: to a temporary file, flushed to disk, then renamed over `path`. A kill at
    any moment leaves the old file or the new one, never half of one. A write that fails (a full
    disk, a quota) removes the temporary file and stops with one line; the old file is kept. A kill
    during the write (SIGKILL) leaves the temporary file: check_writable removes it at the next start."""
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"  # its own name: two runs saving at once never write one file
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too: no .tmp file is left behind
        Path(tmp).unlink(missing_ok=True)
        if not (isinstance(e, OSError) or isinstance(e, RuntimeError) and "inline_container" in str(e)):
            raise  # not a failed write (torch.save reports one as a RuntimeError from inline_container.cc)
        if isinstance(e, FileNotFoundError):  # not a full disk: the folder or the temporary file was deleted
            common.fail(f"could not write {path}: {tmp} or its folder was deleted during the write (by another run "
                        "started in that folder?); give each run its own --output-dir, then run the same command "
                        "again to resume")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        kept = f"{Path(path).name} is unchanged; " if os.path.exists(path) else ""
        common.fail(f"could not write {path} ({reason}: a full disk or quota?); {kept}free some space, then run "
                    "the same command again to resume")


def check_finite(state, step, path):
    """Before saving: a step whose loss was finite can still leave NaN or inf weights (an update too
    large); saving them would replace a good last.pt with a broken one. One read-back per save."""
    if not torch.stack([t.isfinite().all() for t in state.values() if t.is_floating_point()]).all():
        kept = f"{path} is kept" if os.path.exists(path) else "nothing was saved"
        common.fail(f"the weights became NaN or inf by step {step}: stopped, {kept}; lower --lr, use --precision "
                    "fp32, or check the data")


def check_last_writer(path, write_id):
    """Before replacing last.pt: it must still hold the "write_id" this run last read or wrote there
    (None: no file yet, or one from before write ids). Otherwise a second run writes to the same
    folder (two jobs given one --output-dir): this one stops without saving, leaving that run's file."""
    found = None
    if os.path.exists(path):
        try:  # mmap: the tensors are not read
            found = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("write_id", None)
        except Exception:
            found = "unreadable"
    if found != write_id:
        common.fail(f"{path} was replaced or removed by another run since this one last read or wrote it: two runs "
                    f"share --output-dir {Path(path).parent}; this one stops without saving (metrics.csv may hold "
                    "rows of both); give each run its own --output-dir")


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain containers only, so a file holding
    pickled code is refused, never run. Any failure is one clear line."""
    if os.path.isdir(path):
        common.fail(f"checkpoint {path} is a folder; give the file, such as {Path(path) / 'last.pt'}")
    if not os.path.isfile(path):
        common.fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        objects = re.search("Unsupported (global|class)", str(e)) or zipfile.is_zipfile(path)  # torch 2.4+ | 2.3
        if isinstance(e, pickle.UnpicklingError) and objects:
            common.fail(f"{path} holds pickled Python objects, not only tensors: refused (loading it could run code); "
                        "give a checkpoint written by these scripts")
        common.fail(f"{path} is not a readable checkpoint ({type(e).__name__}): truncated, corrupt or another kind "
                    "of file; give a last.pt or backbone.pt of these scripts (a damaged last.pt: delete it to start "
                    "again)")
    if not isinstance(ckpt, dict) or "backbone" not in ckpt or "backbone_meta" not in ckpt:
        common.fail(f"{path} is not a checkpoint of these scripts (no backbone and backbone_meta entries)")
    return ckpt


def write_args(args, folder):
    """args.json: the run's flags, as its checkpoint holds them. Written as save_checkpoint writes: to
    a temporary file renamed over it, a failed write one line (the old file kept)."""
    path, tmp = Path(folder) / "args.json", Path(folder) / f"args.json.{os.urandom(4).hex()}.tmp"
    try:
        tmp.write_text(json.dumps(vars(args), indent=2))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        common.fail(f"could not write {path} ({e.strerror or e}: a full disk or quota?); free some space, then run "
                    "the same command again")


def check_writable(folder):
    """Fail at start, before any training, if checkpoints cannot be written to `folder`."""
    if Path(folder).exists() and not Path(folder).is_dir():
        common.fail(f"--output-dir {folder} is a file, not a folder; give a folder")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for stale in [*Path(folder).glob("last.pt.*.tmp"), *Path(folder).glob("backbone.pt.*.tmp"),
                      *Path(folder).glob("args.json.*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a save killed while writing (see save_checkpoint)
        with open(Path(folder) / ".write_test", "wb") as f:
            f.write(b"0" * 65536)
        os.remove(Path(folder) / ".write_test")
    except OSError as e:
        common.fail(f"cannot write to --output-dir {folder} ({e.strerror}); choose a writable folder with free space")


def rng_states():
    """Rank 0's random states. Every process is seeded alike and draws alike (drop path: same shapes;
    the augmentations have their own seeds), so they are every process's, each on its own GPU."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            # this process's GPU; a CPU run on a GPU machine has not started CUDA, and must not start it here
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"][0])  # onto this process's GPU (older checkpoints: GPU 0 first)
    np.random.set_state(("MT19937", s["numpy"][0].numpy().astype(np.uint32), *s["numpy"][1:]))


# ---- Logging -------------------------------------------------------------------------------
# SHARED: identical in every script


# The columns of metrics.csv; a method may add its own metrics after them (dino.py: the teacher
# entropy), summed in run.losses next to the loss: run.losses[row or epoch] = [loss, metrics...].
FIELDS = ["kind", "epoch", "step", "loss", "lr", "img_per_s", "peak_mem_mb", "knn_top1", "time_s"]


class CSVLogger:
    """metrics.csv, one row per log step and per epoch. On resume the rows past the checkpoint's
    step are dropped, so every step appears once however often the run was interrupted; so is the
    epoch row at that step if the checkpoint's epoch end was `postponed` (a run that wrote it then
    died before its next save): the resumed run writes it again."""

    def __init__(self, path, fields, resume_step=None, postponed=False):
        self.path, self.fields = path, fields
        rows = []
        try:
            if resume_step is not None and os.path.exists(path):
                with open(path, newline="") as f:  # a row cut short by a kill (empty or missing fields) goes too
                    reader = csv.DictReader(f)
                    if reader.fieldnames and reader.fieldnames[:3] != fields[:3]:  # its rows would all be dropped
                        raise ValueError(f"its first line is not the header {','.join(fields[:3])},...")
                    rows = [r for r in reader if None not in r.values() and r["step"].isdigit()
                            and int(r["step"]) <= resume_step - (postponed and r["kind"] == "epoch")]
            with open(f"{path}.tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(f"{path}.tmp", path)
        except (OSError, ValueError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
            Path(f"{path}.tmp").unlink(missing_ok=True)
            common.fail(f"cannot rewrite {path} on resume ({getattr(e, 'strerror', None) or e}); the checkpoint is "
                        "kept; move that file away (or free some space), then run the same command again")

    def log(self, **row):
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        except OSError as e:  # the next checkpoint would fail too; a row cut short is dropped on resume
            common.fail(f"could not append to {self.path} ({e.strerror or e}: a full disk or quota?); the last "
                        "checkpoint is kept; free some space, then run the same command again to resume")


def peak_memory_mb(device):
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)  # B, KiB


def log_row(run, args, kind, knn=None):
    """Mean loss since the last row ("step") or over the epoch ("epoch"), averaged over processes;
    a NaN stops the run before anything is saved. Rank 0 prints it and writes it to metrics.csv."""
    if kind == "epoch" and run.n_row:
        log_row(run, args, "step")  # the last steps of the epoch get their own step row first
    if run.world_size > 1:  # both sums: the epoch's, equal everywhere since the last row's all-reduce, stays
        dist.all_reduce(run.losses)  # itself plus the mean of what each process added since
        run.losses /= run.world_size
    n = run.n_row if kind == "step" else run.n_epoch
    means, now = (run.losses[int(kind == "epoch")] / max(1, n)).tolist(), time.time()  # the one read-back
    loss = means[0]
    if not math.isfinite(loss):
        last = Path(args.output_dir) / "last.pt"
        kept = f"{last} is kept" if last.exists() else "nothing was saved"
        common.fail(f"the loss is {loss} at step {run.step}: stopped, {kept}; lower --lr, use --precision fp32, "
                    "or check the data")
    steps, since = (run.n_row, run.t_row) if kind == "step" else (run.step - run.epoch_step0, run.t_epoch)
    # No step since: the end of an epoch whose steps ran in the job before (postponed), with no img/s to give
    img_s, mem = (args.batch_size * steps / (now - since) if steps else None), peak_memory_mb(run.device)
    elapsed = run.elapsed + now - run.t_start
    if kind == "step":
        run.losses[0], run.n_row, run.t_row = 0.0, 0, now
    if run.is_main:
        extra = dict(zip(run.logger.fields[len(FIELDS):], means[1:]))  # the method's own metrics
        speed = "" if not steps else f" {img_s:.0f} img/s" if img_s >= 10 else f" {img_s:.2f} img/s"  # not "0"
        print(f"epoch {run.epoch}{' done' if kind == 'epoch' else ''} step {run.step}/{run.total_steps} "
              f"loss {loss:.4f}" + "".join(f" {k} {v:.4f}" for k, v in extra.items())
              + f" lr {run.lr:.4g}" + speed + f" mem {mem:.0f} MiB"
              + (f" knn {knn:.2f}%" if knn is not None else "") + f" time {elapsed:.0f}s", flush=True)
        run.logger.log(kind=kind, epoch=run.epoch, step=run.step, loss=f"{loss:.6f}", lr=f"{run.lr:.6g}",
                       img_per_s=f"{img_s:.1f}" if steps else "", peak_mem_mb=f"{mem:.0f}", time_s=f"{elapsed:.1f}",
                       knn_top1="" if knn is None else f"{knn:.2f}", **{k: f"{v:.6f}" for k, v in extra.items()})


# ---- Preemption signals --------------------------------------------------------------------
# SHARED: identical in every script


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=USR1@120`): finish the
    step, save, requeue the job, exit 0. SIGTERM (scancel, or a preemption SLURM requeues itself):
    finish the step, save, exit 143 without requeueing, so that scancel stops a job for good.
    Ctrl-C: as SIGTERM, exit 130; a second Ctrl-C stops at once, without saving.
    The handlers only set flags; the training loop acts on them between steps."""

    def __init__(self, world_size, device):
        self.usr1 = self.term = False
        self.world_size, self.name = world_size, "SIGTERM"
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "usr1", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "term", True))
        signal.signal(signal.SIGINT, self.interrupt)
        # Processes agree on stopping through a CPU (gloo) all-reduce: no GPU sync per step.
        self.group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None
        # One tensor for the whole run, never a temporary: with torch < 2.8, a gloo worker thread that
        # frees the last tensor of a collective needs the GIL, and the process group's destructor at
        # exit holds it while waiting for that thread: the job hangs instead of ending.
        self.flags = torch.zeros(2, dtype=torch.int32)

    def requested(self):
        self.flags[0], self.flags[1] = self.usr1, self.term
        if self.world_size > 1:
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group)
        # Only ever set flags here: writing False back could erase a signal arriving meanwhile.
        if self.flags[0]:
            self.usr1 = True
        if self.flags[1]:
            self.term = True
        return bool(self.flags.any())

    def interrupt(self, *_):
        self.term, self.name = True, "Ctrl-C"
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one raises KeyboardInterrupt
        os.write(2, b"Ctrl-C: saving at the end of this step, then stopping (again: stop now, unsaved)\n")

    def exit(self, is_main, message, folder):
        """After saving: on SIGUSR1 under SLURM, requeue the job (it keeps its id, so it resumes from
        `folder`, the --output-dir). In a job array, only this element: `scontrol requeue` of the array's
        id, which is also its last element's job id, requeues every element, cancelled and ended ones too."""
        job, failed = os.environ.get("SLURM_JOB_ID"), False
        if "SLURM_ARRAY_TASK_ID" in os.environ:  # an array's element: its own id may also name the whole array
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if is_main:
            print(f"{self.name if self.term else 'SIGUSR1'}: {message}", flush=True)
            if self.usr1 and not self.term and job:
                try:
                    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
                    print(f"requeued SLURM job {job}", flush=True)
                except (OSError, subprocess.SubprocessError) as e:  # exit 1: the job ends FAILED, not COMPLETED
                    print(f"error: could not requeue job {job} ({e}); to resume, submit it again with --output-dir "
                          f"{folder} and the same arguments (sbatch/*.sh: OUTPUT_DIR={folder} sbatch ...)",
                          file=sys.stderr)
                    failed = True
        cleanup_distributed()
        sys.exit((130 if self.name == "Ctrl-C" else 143) if self.term else int(failed))


def gives_back_signal_handlers(main):
    """main() called from a notebook or another program: when it ends, however it ends, the caller's
    handlers of Ctrl-C, SIGTERM and SIGUSR1 are put back (the run's Preemption would swallow the next
    Ctrl-C, and keep SIGTERM from stopping the program)."""
    @functools.wraps(main)
    def run_main(args):
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            return main(args)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: set outside Python, nothing to put back
                    signal.signal(sig, handler)
    return run_main


# ---- kNN monitor ---------------------------------------------------------------------------
# SHARED: identical in every script


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, workers, device, rank, world_size, stop=None):
    """Backbone features (eval mode; fp32, computed under the caller's autocast if any) and labels of
    every image of `dataset`, in order. Each process computes every world_size-th image and all_gather
    puts them back in place. The labels are the loader's: an unreadable file's row holds the image that
    replaced it, and that one's label.
    `stop` (every process's Preemption.requested) is asked before each batch that every process has:
    on a large dataset this takes minutes, more than a time limit's warning. None once it says stop."""
    backbone.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    # Its own generator: iterating a loader draws a seed from torch's global one, so a kNN cut short by
    # a stop and done again by the resumed run would shift the training's random numbers (drop path).
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda", worker_init_fn=common.quiet_worker,
                                         multiprocessing_context=common.loader_context(workers))
    feats, labels = [], []
    for i, (x, y) in enumerate(loader):
        if stop and i < len(dataset) // world_size / batch_size and stop():  # the same calls in every process
            return None
        feats.append(backbone(x.to(device, non_blocking=True)).float())
        labels.append(y)
    if not feats:  # fewer images than processes: none here, but this one's (empty) share is gathered too
        x, y = torch.utils.data.default_collate([dataset[0]])
        feats, labels = [backbone(x.to(device))[:0].float()], [y[:0]]
    feats, labels = torch.cat(feats), torch.cat(labels).to(device)
    if world_size > 1:
        pad = math.ceil(len(dataset) / world_size) - len(feats)
        feats, labels = F.pad(feats, (0, 0, 0, pad)), F.pad(labels, (0, pad))
        gathered = [[torch.empty_like(t) for _ in range(world_size)] for t in (feats, labels)]
        dist.all_gather(gathered[0], feats)
        dist.all_gather(gathered[1], labels)
        # image j*W + r is gathered[r][j]
        feats, labels = (torch.stack(g, 1).flatten(0, 1)[: len(dataset)] for g in gathered)
    return feats, labels


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018): the k nearest training features (cosine similarity) vote for
    their class with weight exp(similarity / temperature). k=200 and temperature 0.1 as in lightly's
    benchmarks, whose kNN figures the docstrings quote (DINO's eval_knn.py: 0.07, k from 10 to 200).
    Returns the class scores, n_test x num_classes."""
    scores = []
    for chunk in test_feats.split(1024):
        sim, idx = (chunk @ train_feats.T).topk(min(k, len(train_feats)), dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(scores)


def knn_accuracy(backbone, data, args, device, rank, world_size, stop=None):
    """Top-1 (%) of the weighted kNN classifier on the test split, train split as memory bank; None
    if `stop` said to stop (see extract_features)."""
    t = common.eval_transform(data.image_size, data.mean, data.std)
    features = []
    for split in (data.train, data.test):
        features.append(extract_features(backbone, split.with_transform(t), 256, args.workers, device, rank,
                                         world_size, stop))
        if features[-1] is None:
            return None
    (bank, bank_labels), (test, test_labels) = features
    scores = knn_predict(F.normalize(bank, dim=1), bank_labels, F.normalize(test, dim=1), data.num_classes)
    return (scores.argmax(1) == test_labels).float().mean().item() * 100


# ---- Training ------------------------------------------------------------------------------


def train_one_epoch(head, batches, optimizer, run, args):
    """Train the linear layer on (features, labels) batches; stop early on a signal or at run.end_step."""
    head.train()
    for feats, labels in batches:
        run.lr = cosine_schedule(run.step, run.total_steps, run.warmup_steps, run.base_lr)
        for g in optimizer.param_groups:
            g["lr"] = run.lr * g["lr_scale"]
        loss = F.cross_entropy(head(feats), labels)  # the head trains in fp32, on fp32 features: no loss scaling
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.step += 1
        run.losses += loss.detach()  # [since the last row, this epoch]: read back only when logging
        run.n_row, run.n_epoch = run.n_row + 1, run.n_epoch + 1
        if run.step % args.log_every == 0:
            log_row(run, args, "step")
        if run.preemption.requested() or run.step >= run.end_step:
            return


def epoch_batches(epoch, skip, run, args, backbone, loader, train_feats, train_labels):
    """This process's (features, labels) batches of one epoch, from the `skip`-th on.
    linear: augmented images through the frozen backbone; fast: a permutation of the stored
    features, split across processes like EpochSampler splits images."""
    local_batch = args.batch_size // run.world_size
    if args.mode == "fast":
        perm = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(args.seed + epoch))
        perm = perm[run.rank::run.world_size].to(run.device)  # once per epoch: a plain copy waits for the GPU
        for i in range(skip, run.steps_per_epoch):
            idx = perm[i * local_batch:(i + 1) * local_batch]
            yield train_feats[idx], train_labels[idx]
        return
    loader.sampler.set_epoch(epoch, skip=skip * local_batch)
    for (x,), y in loader:  # one view
        x = x.to(run.device, non_blocking=True, memory_format=run.memory_format)
        with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            feats = backbone(x)
        yield feats.float(), y.to(run.device, non_blocking=True)


def save_state(path, raw_head, optimizer, run, args):
    """Every process calls it (pending losses are averaged and checked first); rank 0 writes."""
    if run.n_row:
        log_row(run, args, "step")
    state = raw_head.state_dict()
    check_finite(state, run.step, path)  # every process: they stop together
    if run.is_main:
        check_last_writer(path, run.write_id)
        run.write_id = os.urandom(8).hex()  # this write's id, checked before the next one
        save_checkpoint({
            "method": "linear_eval", "args": vars(args), "step": run.step, "epoch": run.epoch,
            "head": state, "optimizer": optimizer.state_dict(),
            "rng": rng_states(), "elapsed": run.elapsed + time.time() - run.t_start,
            "epoch_loss": [run.losses[1].tolist(), run.n_epoch],
            "backbone": run.backbone.state_dict(), "backbone_meta": run.backbone_meta,
            "num_images": run.num_images, "data_fingerprint": run.data_fingerprint, "write_id": run.write_id}, path)
        # The flags of the last.pt just written: another run started in the same folder (which stops at its
        # first save, above) wrote its own at its start.
        write_args(args, Path(path).parent)
    run.t_row = time.time()  # the next row's img/s counts training time, not this save


def exit_stopped(run, is_main, message, out, step0):
    """After a stop signal and the save: Preemption.exit (requeue on SIGUSR1 under SLURM), unless a
    requeued job got the time limit's warning before its first step (during the features, or at
    the start-up): the next job would get the same --time and spend it the same way, requeued without
    end. Then exit 1 (the job FAILED: an afterok dependency does not start), saying what to change."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not (job and restarts and run.step == step0 and not run.preemption.term):  # SIGUSR1 alone: the warning
        run.preemption.exit(is_main, message, out)
    if is_main:
        print(f"error: requeued job {job} (restart {restarts}) got SIGUSR1 before its first step, and the next one "
              f"would too with the same --time: not requeued; {out / 'last.pt'} is kept (step {run.step}): give the "
              f"job a longer --time, then submit it again with --output-dir {out}", file=sys.stderr, flush=True)
    cleanup_distributed()
    sys.exit(1)


def same_tensors(a, b):
    """The same names, and equal tensors under each (a probe checkpoint's backbone against --ckpt's)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def load_backbone(args):
    """The weights of the backbone to evaluate (None: --ckpt random), its metadata, and the
    pretraining arguments (dataset defaults)."""
    if args.ckpt == "random":
        args.arch = args.arch or "resnet18"
        if args.patch_size is not None and args.arch not in VIT_SIZES:  # before the image size is checked against it
            common.fail(f"--patch-size applies to ViT backbones, not {args.arch}; drop it or use --arch vit_*")
        return None, {"arch": args.arch, "patch_size": args.patch_size}, {}
    ckpt = load_checkpoint(args.ckpt)
    arch = ckpt["backbone_meta"].get("arch")
    if arch not in ARCHS:  # written by a newer version of the scripts, or edited
        common.fail(f"{args.ckpt} holds a backbone {arch!r}, which this linear_eval.py does not build "
                    f"({', '.join(ARCHS)}); evaluate it with the version of the scripts that trained it")
    if not all(t.isfinite().all() for t in ckpt["backbone"].values() if t.is_floating_point()):
        common.fail(f"{args.ckpt} holds NaN or inf weights (its training diverged): evaluate an earlier checkpoint, "
                    "or train again with a lower --lr")
    return ckpt["backbone"], ckpt["backbone_meta"], ckpt.get("args", {})


@gives_back_signal_handlers
def main(args):
    # 1. Processes, device, precision, seeds ------------------------------------------------
    rank, local_rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    # From here a stop signal is kept for the end of the first step: its default action would kill a job
    # whose time-limit warning comes during the start-up (data, model), without saving or requeueing it.
    preemption = Preemption(world_size, device)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set either way: an earlier main() in the same process (a notebook) may have turned it on.
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)  # warn where CUDA has no such kernel
    torch.backends.cudnn.benchmark = not args.deterministic
    amp_dtype = autocast_dtype(args, device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    # 2. The backbone's checkpoint; dataset defaults from its pretraining --------------------
    state, meta, pretrain_args = load_backbone(args)
    same_data = args.dataset in (None, pretrain_args.get("dataset"))
    args.dataset = args.dataset or pretrain_args.get("dataset", "cifar10")
    if same_data and not args.data_dir:  # evaluate on the pretraining data (and its split) unless told otherwise
        args.data_dir = pretrain_args.get("data_dir")
        on_disk = args.dataset in ("imagefolder", "npz", "packed")  # the others are downloaded where they are missing
        if on_disk and args.data_dir and not Path(args.data_dir).exists():  # a relative path, run from elsewhere
            common.fail(f"the pretraining's --data-dir {args.data_dir} (from {args.ckpt}) is not found from "
                        f"{Path.cwd()}; give --data-dir, or run from the folder the pretraining ran in")
    usual = argparse.ArgumentParser()
    common.add_data_args(usual)
    for key in ("val_fraction", "synthetic_size"):  # a flag given wins, then the pretraining's value
        if getattr(args, key) is None:
            setattr(args, key, pretrain_args.get(key, usual.get_default(key)) if same_data else usual.get_default(key))
    args.data_dir = args.data_dir or "./data"
    args.image_size = args.image_size or meta.get("image_size")
    if args.ckpt != "random" and args.patch_size not in (None, meta.get("patch_size")):
        trained = f"patch size {meta['patch_size']}" if meta.get("patch_size") else "no patches"
        common.fail(f"--patch-size {args.patch_size}: {args.ckpt} holds a {meta['arch']} with {trained}; "
                    "drop the flag")
    if args.arch not in (None, meta["arch"]):  # it was ignored, yet recorded in args.json
        common.fail(f"--arch {args.arch}: {args.ckpt} holds a {meta['arch']}; drop the flag")
    args.arch = meta["arch"]  # args.json and the probe's checkpoint say what was evaluated

    # 3. Output directory, and the probe checkpoint to resume from ---------------------------
    # One folder per kind of evaluation, so that the fast and the linear probe (or baselines on two
    # datasets) do not take each other's last.pt for a probe to resume.
    suffix = "_fast" if args.mode == "fast" else ""
    default_out = (Path(args.ckpt).parent / f"linear_eval{suffix}" if args.ckpt != "random"
                   else Path(f"runs/linear_eval_random_{args.dataset}_{meta['arch']}{suffix}"))
    out, out_given = Path(args.output_dir or default_out), args.output_dir is not None
    args.output_dir, last = str(out), out / "last.pt"
    if is_main:
        check_writable(out)
    resume_from = last if last.exists() else args.resume
    if is_main and args.resume and last.exists() and Path(args.resume).resolve() != last.resolve():
        print(f"note: --resume {args.resume} is not used: {last} exists and the run continues from it", flush=True)
    ckpt = load_checkpoint(resume_from) if resume_from else None
    if ckpt and ckpt.get("method") != "linear_eval":
        common.fail(f"{resume_from} was written by {ckpt.get('method')}.py, not linear_eval.py: "
                    + ("give another --output-dir" if resume_from == last else "--resume takes a probe's last.pt (the "
                       "pretraining checkpoint goes to --ckpt); change or drop it"))
    if ckpt and ckpt.get("args", {}).get("mode", args.mode) != args.mode:  # until 2026-12-01 both modes shared a folder
        old = ckpt["args"]["mode"]
        common.fail(f"{resume_from} is a probe of --mode {old}: to go on with it, give --mode {old}"
                    + (f" --output-dir {out}; for a --mode {args.mode} probe, give another --output-dir"
                       if resume_from == last else f"; for a --mode {args.mode} probe, drop --resume"))
    old_fast = default_out.parent / "linear_eval" / "last.pt"  # where a fast probe went until 2026-12-01
    if is_main and not ckpt and not out_given and args.mode == "fast" and args.ckpt != "random" and old_fast.exists():
        try:
            if torch.load(old_fast, map_location="cpu", weights_only=True, mmap=True)["args"]["mode"] == "fast":
                print(f"note: {old_fast} is a fast probe of an older version, which wrote there: to go on with it, "
                      f"give --output-dir {old_fast.parent}; this one starts in {out}", flush=True)
        except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):  # no probe: nothing to point at
            pass

    # 4. Data --------------------------------------------------------------------------------
    if is_main:
        common.download_data(args)
    wait_for_rank0(world_size, preemption.group)
    data = common.load_data(args)
    args.image_size = data.image_size
    if ckpt:  # a probe resumes only the same evaluation; its optimizer's state carries weight decay, eta, clip
        common.check_same_flags(resume_from, ckpt["args"], args, (
            *(("arch",) if args.ckpt == "random" else ()), "patch_size", "dataset", "val_fraction",
            "synthetic_size", "image_size", "mode", "batch_size", "seed", "optimizer", "weight_decay",
            *(("lars_eta", "lars_clip") if args.optimizer == "lars" else ())))
    if meta.get("patch_size") and data.image_size % meta["patch_size"]:
        common.fail(f"--image-size {data.image_size} is not a multiple of the ViT patch size {meta['patch_size']} "
                    f"of {args.ckpt}; change --image-size")
    if data.train is None:
        common.fail(f"linear evaluation needs labels, and {args.dataset} in {args.data_dir} has none "
                    "(a flat or one-class image folder, or no test images?); give a labeled --dataset/--data-dir")
    if args.batch_size > len(data.train):
        common.fail(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images; lower it")
    eval_t = common.eval_transform(data.image_size, data.mean, data.std)

    # 5. Frozen backbone and the linear layer ------------------------------------------------
    # Built for the pretraining image size (the ResNet stem, the ViT position-embedding grid) even
    # when evaluated on another: a ViT interpolates its position embeddings to the input.
    backbone, backbone_meta = build_backbone(meta["arch"], meta.get("image_size") or data.image_size,
                                             meta.get("patch_size"))
    feat_dim = backbone_meta["feat_dim"]
    if state is not None:
        try:
            backbone.load_state_dict(state)
        except RuntimeError as e:
            common.fail(f"{args.ckpt}: the stored backbone does not fit a {meta['arch']} ({str(e).splitlines()[0]})")
    # A probe resumes only on the backbone it was trained on, compared by weights, not by --ckpt's path: a run's
    # backbone.pt and last.pt share a folder and hold the same backbone, while a --ckpt written again since
    # (pretraining went on in that folder) holds another, on which the old probe must not be scored.
    if ckpt and not same_tensors(ckpt["backbone"], backbone.state_dict()):
        was = ckpt["args"].get("ckpt") or "random"
        again = "random" not in (was, args.ckpt) and Path(was).resolve() == Path(args.ckpt).resolve()  # however spelled
        since = "it was written again since?" if again else f"the probe is of --ckpt {was}"
        than = "--ckpt random" if args.ckpt == "random" else f"the one {args.ckpt} holds now"
        common.fail(f"{resume_from} is a probe of another backbone than {than} ({since}): delete {out} to probe the "
                    "new one, or give another --output-dir")
    if ckpt and ckpt.get("num_images", len(data.train)) != len(data.train):  # another --data-dir, same flags
        common.fail(f"{resume_from} is a probe trained on {ckpt['num_images']} images, these data hold "
                    f"{len(data.train)}: use the same images to resume, or another --output-dir")
    # As many images, yet others (another npz file, class folders renamed): the old linear layer must not be
    # scored on them. A probe saved before fingerprints: its number of classes at least.
    data_id = common.fingerprint(data.train, data.test)
    head_classes = ckpt and len(ckpt["head"].get("1.weight", ()))  # the linear layer's rows
    if ckpt and (ckpt.get("data_fingerprint", data_id) != data_id or head_classes != data.num_classes):
        what = (f"of {head_classes} classes, these data have {data.num_classes}" if head_classes != data.num_classes
                else f"trained on other images or labels than --dataset {args.dataset} --data-dir {args.data_dir}")
        common.fail(f"{resume_from} is a probe {what}: use the same data to resume, or another --output-dir")
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    backbone = backbone.to(device, memory_format=memory_format).eval().requires_grad_(False)
    # MAE's linear probe (He et al. 2022, appendix A.1): BatchNorm without affine parameters
    # standardises the features, so one learning rate fits every backbone; it is still a linear
    # classifier (the BN folds into the linear layer at test time).
    raw_head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), nn.Linear(feat_dim, data.num_classes))
    nn.init.normal_(raw_head[1].weight, std=0.01)  # as in MoCo's and DINO's linear evaluation
    nn.init.zeros_(raw_head[1].bias)
    raw_head = raw_head.to(device)
    head = raw_head
    if world_size > 1:
        raw_head = convert_sync_batchnorm(raw_head, device)
        head = nn.parallel.DistributedDataParallel(raw_head)
    optimizer = make_optimizer(raw_head.parameters(), args)

    local_batch = args.batch_size // world_size

    def features_of(split):
        """(features, labels) of the un-augmented images; (None, None) if a stop is asked for meanwhile.
        The backbone runs as in the linear mode's steps: under --precision's autocast, local_batch images
        at a time (lower --batch-size if out of memory), so the probe is scored on features like its own."""
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return extract_features(backbone, split.with_transform(eval_t), local_batch, args.workers, device, rank,
                                    world_size, preemption.requested) or (None, None)

    train_feats = train_labels = loader = None
    if args.mode == "fast":
        steps_per_epoch = len(data.train) // args.batch_size
    else:
        probe_t = common.probe_transform(data.image_size, data.mean, data.std)
        loader = common.pretrain_loader(data.train, [probe_t], local_batch, world_size, rank, args, device)
        steps_per_epoch = len(loader)
    if ckpt:  # before the features, which take minutes on a large dataset
        common.check_not_past_end(resume_from, ckpt["step"], steps_per_epoch, args)
    if args.mode == "fast":  # None if a stop is asked for meanwhile: the run then saves and stops, untrained
        train_feats, train_labels = features_of(data.train)

    # 6. Run state, resumed from the probe checkpoint ----------------------------------------
    run = argparse.Namespace(  # what changes during the run, shared by the loop and the logger
        device=device, amp_dtype=amp_dtype, memory_format=memory_format, is_main=is_main, world_size=world_size,
        rank=rank, step=0, epoch=0, lr=0.0, elapsed=0.0, n_row=0, n_epoch=0, losses=torch.zeros(2, 1, device=device),
        base_lr=args.lr * args.batch_size / 256, total_steps=args.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=args.warmup_epochs * steps_per_epoch, preemption=preemption,
        backbone=backbone, backbone_meta=backbone_meta, num_images=len(data.train), data_fingerprint=data_id,
        write_id=ckpt.get("write_id") if resume_from is last else None)
    run.end_step = min(run.total_steps, args.max_steps or run.total_steps)
    if ckpt:
        raw_head.load_state_dict(ckpt["head"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        set_rng_states(ckpt["rng"])
        run.step, run.elapsed, (epoch_sums, run.n_epoch) = ckpt["step"], ckpt["elapsed"], ckpt["epoch_loss"]
        run.epoch = ckpt["epoch"]  # kept if no epoch is left to train: rerunning a finished run saves it again
        run.losses[1] = torch.tensor(epoch_sums)
    step0 = run.step  # this job's first step: see exit_stopped
    if is_main and run.warmup_steps >= run.total_steps:  # a short run with the recipe's warm-up: say so
        print(f"warning: --warmup-epochs {args.warmup_epochs} covers the whole run: the learning rate rises "
              f"toward {run.base_lr:.4g} all run long and never decays; lower --warmup-epochs for a short run",
              file=sys.stderr, flush=True)
    if is_main:
        if ckpt:
            common.note_changed_flags(resume_from, ckpt["args"], args)
        # the rows of the run resumed, if its own: another run's (left by a lost last.pt) go
        run.logger = CSVLogger(out / "metrics.csv", FIELDS, resume_step=run.step if resume_from is last else None)
        write_args(args, out)
        print(f"{f'resumed from {resume_from} at step {run.step}' if ckpt else 'new probe'} of {args.ckpt} "
              f"({meta['arch']}) on {args.dataset}: {len(data.train)} train / {len(data.test)} test images at "
              f"{args.image_size} px, {args.mode} mode, {world_size} process(es) on {device.type}, "
              f"{steps_per_epoch} steps/epoch", flush=True)

    # 7. Train the linear layer --------------------------------------------------------------
    run.t_start = run.t_row = time.time()
    for epoch in range(run.step // steps_per_epoch, args.epochs):
        if run.step >= run.end_step or run.preemption.requested():  # stopped before: during the features
            break
        run.epoch, run.t_epoch, run.epoch_step0 = epoch, time.time(), run.step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the logged peak memory is this epoch's
        batches = epoch_batches(epoch, run.step - epoch * steps_per_epoch, run, args, backbone, loader,
                                train_feats, train_labels)
        train_one_epoch(head, batches, optimizer, run, args)
        stopping = run.preemption.requested()
        if run.step == (epoch + 1) * steps_per_epoch:
            log_row(run, args, "epoch")
            run.losses[1], run.n_epoch = 0.0, 0
            if (epoch + 1) % args.save_every == 0 and not stopping and run.step < run.end_step:  # the end: once, below
                save_state(last, raw_head, optimizer, run, args)
        if stopping:
            break
    save_state(last, raw_head, optimizer, run, args)
    if run.preemption.requested():  # all processes agree on how to end
        exit_stopped(run, is_main, f"stopped at step {run.step}, saved {last}", out, step0)

    # 8. Evaluate: top-1/top-5 of the probe and kNN on the test split ------------------------
    # A stop asked for while the features are computed (minutes on a large dataset) ends the run as one
    # at a step does: last.pt is saved (above), and the requeued job, at its last step, evaluates.
    test_feats, test_labels = features_of(data.test)
    if args.knn_every and train_feats is None and test_feats is not None:
        train_feats, train_labels = features_of(data.train)
    if test_feats is None or args.knn_every and train_feats is None:
        exit_stopped(run, is_main, f"stopped at step {run.step} before the evaluation, saved {last}", out, step0)
    with torch.no_grad():
        top = raw_head.eval()(test_feats).topk(min(5, data.num_classes), dim=1).indices == test_labels[:, None]
    # Percentages to 4 decimals (float32 noise beyond); top-5 of 5 classes or fewer is 100% whatever the probe
    results = {"ckpt": args.ckpt, "arch": meta["arch"], "dataset": args.dataset,
               "data_dir": None if args.dataset == "synthetic" else str(Path(args.data_dir).resolve()),
               "image_size": data.image_size, "num_classes": data.num_classes, "train_images": len(data.train),
               "test_images": len(data.test), "data_fingerprint": data_id, "mode": args.mode,
               "epochs": args.epochs, "steps": run.step, "total_steps": run.total_steps,
               "top1": round(top[:, 0].float().mean().item() * 100, 4),
               "top5": round(top.any(1).float().mean().item() * 100, 4) if data.num_classes > 5 else None,
               "knn_top1": None}
    if args.knn_every:
        scores = knn_predict(F.normalize(train_feats, dim=1), train_labels, F.normalize(test_feats, dim=1),
                             data.num_classes)
        results["knn_top1"] = round((scores.argmax(1) == test_labels).float().mean().item() * 100, 4)
    if is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        top5 = f", top-5 {results['top5']:.2f}%" if results["top5"] is not None else ""
        knn = f", kNN top-1 {results['knn_top1']:.2f}%" if results["knn_top1"] is not None else ""
        part = f", {run.step} of {run.total_steps} steps (--max-steps)" if run.step < run.total_steps else ""
        print(f"{args.ckpt}: linear top-1 {results['top1']:.2f}%{top5}{knn} ({args.dataset} test, {args.mode} "
              f"mode{part}); written to {out / 'results.json'}", flush=True)
    cleanup_distributed()


if __name__ == "__main__":
    # Under `python -u` or PYTHONUNBUFFERED=1 each write goes out alone, and Python prints an error line and its
    # newline apart: torchrun's processes, sharing one stderr, stopped at once on lines run together (srun
    # forwards whole lines). Now a line is one write.
    if hasattr(sys.stderr, "reconfigure"):  # not in a notebook's %run, whose stderr is no file
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
    args = get_args_parser().parse_args()
    interactive = sys.flags.interactive or hasattr(sys, "ps1") or "IPython" in sys.modules  # it goes on after
    try:
        # As a script, the run's signal handlers stay on until the finally below ignores the signals (a
        # SIGTERM in between would kill it); in a session, main() gives the session's back.
        (main if interactive else main.__wrapped__)(args)
    except common.UnreadableImages as e:  # maybe raised in a loader process: one line, no traceback
        common.fail(str(e).strip().splitlines()[-1].split("UnreadableImages: ")[-1])
    except KeyboardInterrupt:  # Ctrl-C before training starts, or a second one: one line, exit 130 as the first
        if args.output_dir and (Path(args.output_dir) / "last.pt").exists():
            print(f"error: interrupted: what was trained since the last checkpoint in {args.output_dir} is lost; run "
                  "the same command to resume from it", file=sys.stderr)
        else:
            print("error: interrupted before the first checkpoint: nothing was saved; the same command starts again",
                  file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError as e:  # a batch too large for the GPU: what to change, not a traceback
        need = re.search(r"Tried to allocate [\d.]+ \w+", str(e))
        common.fail(f"out of GPU memory with --batch-size {args.batch_size}" + (f" ({need[0]})" if need else "")
                    + "; lower --batch-size (it is global: more GPUs also help) or use --precision bf16 or fp16")
    except RuntimeError as e:  # the same on the CPU, where torch raises a plain RuntimeError (its C++ assertion)
        need = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", str(e))
        if need:
            common.fail(f"out of host memory with --batch-size {args.batch_size} (tried to allocate "
                        f"{int(need[1]) / 2**30:.2f} GiB); lower --batch-size, or run where more memory is free")
        no_compiler = re.search(r".*\bC(\+\+)? compiler\b.*", str(e))  # not found: inductor's (CPU) or Triton's (GPU)
        if getattr(args, "compile", False) and isinstance(e, torch._dynamo.exc.BackendCompilerFailed) and no_compiler:
            common.fail(f"--compile needs a compiler ({no_compiler[0].strip()}); drop --compile, or make one "
                        "available (g++ on a CPU, gcc for Triton on a GPU; CXX or CC names it)")
        raise  # any other failure of the compiler keeps its traceback, for a report to PyTorch
    finally:  # ended, saved or not: Python's shutdown (a second or two with torch) gives handled signals back
        # their default action, so SLURM's or torchrun's SIGUSR1/SIGTERM then killed a finished run (exit -15,
        # a failed step) instead of its exit 0 or 143; ignored now. Ctrl-C still stops it at once. Not in an
        # interactive session (python -i, a notebook's %run), which goes on: main() gave its handlers back.
        for sig, action in ((signal.SIGUSR1, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_IGN),
                            (signal.SIGINT, signal.SIG_DFL)):
            if not interactive:
                signal.signal(sig, action)
