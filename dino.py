"""DINO: self-distillation with no labels (Emerging Properties in Self-Supervised Vision Transformers).
Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin, ICCV 2021, https://arxiv.org/abs/2104.14294

A student network (backbone and DINO head) learns to match, on every crop of an image, the output
distribution that a teacher network gives on the two large "global" crops of the same image. The
teacher is an exponential moving average of the student; centring and sharpening its output is
what keeps the two from collapsing. The student also sees small "local" crops (multi-crop), so it
learns local-to-global correspondences. Works with ResNets and Vision Transformers.

Launch (the batch size is global, whatever the number of processes):
    python dino.py                                      # CIFAR-10, ResNet-18, one GPU or the CPU
    python dino.py --arch vit_small --local-crops 6     # ViT-S/4 with multi-crop (AdamW recipe)
    torchrun --nproc_per_node=4 dino.py                 # 4 GPUs of one machine
    sbatch sbatch/dino.sh --epochs 200                  # SLURM: srun starts one task per GPU
    python dino.py --dataset imagefolder --data-dir ~/imgs --arch vit_small --image-size 224  # own images
    python dino.py --dataset synthetic --device cpu --epochs 2 --warmup-epochs 0 --batch-size 64  # CPU demo
    python linear_eval.py --ckpt runs/dino/last.pt      # evaluate the teacher backbone afterwards
Starting the same command again resumes from <output-dir>/last.pt.

Defaults depend on the backbone. ResNets: solo-learn's CIFAR recipe (scripts/pretrain/cifar/dino.yaml):
LARS (clipped rate, eta 0.02, lr 0.3 x batch/256, weight decay 1e-6), 2 crops. ViTs: the DINO paper's ViT-S recipe
(AdamW, lr 5e-4 x batch/256 down to 1e-6, weight decay 0.04 -> 0.4 cosine, gradient clipping 3.0,
drop path 0.1), patch size 4 on 32 px images. Both: batch 256, 10 warm-up epochs then cosine, teacher
momentum 0.996 -> 1, head 2048 -> 256 -> 4096 prototypes with the last layer frozen during the
first epoch, teacher temperature 0.04 -> 0.07 over 30 epochs, student temperature 0.1, centre
momentum 0.9: the paper's teacher (its momentum is for batch 1024: main_dino.py's help advises 0.9995
at 256, as solo-learn's recipe, which also differs in crop scale 0.08-1 and temperature warm-up;
README.md). Expected for ResNet-18 on CIFAR-10, from the sources, not measured here: about 89.5%
top-1 (solo-learn's recipe, online linear probe, 1000 epochs) and about 81% kNN after 200 epochs
(lightly's benchmark, batch 512). Measured here: see README.md.

Reading order: the method is in Arguments, Model, Loss and Training (about 550 lines). The blocks
marked `# SHARED: identical in every script` (backbone, LARS and schedules, distributed setup,
gathers with gradients and global BatchNorm, checkpoints, logging, preemption, kNN monitor;
about 715 lines) are the same in every script: read them once, in any of them.
"""
import argparse
import csv
import datetime
import functools
import itertools
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

# Written into every checkpoint, and checked on resume; a copy of this file for another method
# renames it, so that the copy refuses this method's runs and saves to runs/<its name>.
METHOD = "dino"


# ---- Arguments -----------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("DINO", description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    # --dataset --data-dir --image-size --val-fraction --synthetic-size --workers --aug-device
    common.add_data_args(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone")  # ARCHS: see Backbone, below
    g.add_argument("--patch-size", type=common.at_least(1), default=None,
                   help="ViT patch size (default: 4 up to 32 px, 8 up to 64 px, else 16)")
    g.add_argument("--drop-path", type=common.fraction, default=None,
                   help="stochastic depth of the student ViT (default: 0.1; ResNets: none)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute ViT blocks in backward: less memory")
    g.add_argument("--out-dim", type=common.at_least(1), default=4096,
                   help="number of prototypes (65536 in the paper, ImageNet)")
    g.add_argument("--head-hidden-dim", type=common.at_least(1), default=2048, help="hidden width of the DINO head")
    g.add_argument("--bottleneck-dim", type=common.at_least(1), default=256, help="dimension before the prototypes")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="fix the norm of the prototypes to 1 (more stable; --no-norm-last-layer learns it)")
    g.add_argument("--freeze-last-layer", type=common.at_least(0), default=1,
                   help="epochs during which the prototypes stay fixed")
    g.add_argument("--momentum-teacher", type=common.fraction, default=0.996,
                   help="teacher EMA momentum at step 0 (cosine to 1)")
    g = parser.add_argument_group("multi-crop")
    g.add_argument("--local-crops", type=common.at_least(0), default=0,
                   help="number of small local crops (the paper: 6 to 10)")
    g.add_argument("--local-crop-size", type=common.at_least(1), default=None,
                   help="local crop size (default: 3/7 of the image, in steps of 8 px; ViTs: whole patches, >= 8 px)")
    g.add_argument("--global-crops-scale", type=float, nargs=2, default=None,
                   help="area range of the global crops (default: 0.4 1 for ViTs with local crops, else 0.14 1)")
    g.add_argument("--local-crops-scale", type=float, nargs=2, default=None,
                   help="area range of the local crops (default: 0.05 0.4 for ViTs, 0.05 0.14 for ResNets)")
    g = parser.add_argument_group("loss")
    g.add_argument("--warmup-teacher-temp", type=common.positive, default=0.04, help="teacher temperature at epoch 0")
    g.add_argument("--teacher-temp", type=common.positive, default=0.07, help="teacher temperature after the warm-up")
    g.add_argument("--warmup-teacher-temp-epochs", type=common.at_least(0), default=30,
                   help="epochs of linear temperature warm-up")
    g.add_argument("--student-temp", type=common.positive, default=0.1, help="student temperature")
    g.add_argument("--center-momentum", type=common.fraction, default=0.9, help="momentum of the teacher-output centre")
    g = parser.add_argument_group("optimisation (x / y: the default of the ResNet recipe / of the ViT recipe; the "
                                  "recipe is the backbone's, or the optimizer's with --optimizer lars or adamw)")
    g.add_argument("--epochs", type=common.at_least(1), default=1000, help="training epochs")
    g.add_argument("--batch-size", type=common.at_least(2), default=256, help="global batch size, over all processes")
    g.add_argument("--optimizer", default=None, choices=["lars", "sgd", "adamw"], help="optimizer (lars / adamw)")
    g.add_argument("--lr", type=common.at_least(0, float, high=1e4), default=None,
                   help="learning rate for a batch of 256 (0.3 / 5e-4)")
    g.add_argument("--min-lr", type=common.at_least(0, float, high=1e4), default=None,
                   help="learning rate at the end of the cosine, not scaled by the batch (0 / 1e-6)")
    g.add_argument("--weight-decay", type=common.at_least(0, float, high=1e4), default=None,
                   help="weight decay at step 0 (1e-6 / 0.04)")
    g.add_argument("--weight-decay-end", type=common.at_least(0, float, high=1e4), default=None,
                   help="weight decay at the end, cosine (--weight-decay / 0.4)")
    g.add_argument("--clip-grad", type=common.at_least(0, float), default=None,
                   help="per-parameter gradient norm clip (0 / 3.0; 0: off)")
    g.add_argument("--lars-eta", type=common.positive, default=0.02, help="LARS trust coefficient")
    g.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="LARS layer rate min(trust ratio, lr), solo-learn's clip_lr (--no-lars-clip: ratio x lr)")
    g.add_argument("--warmup-epochs", type=common.at_least(0), default=10,
                   help="linear warm-up epochs before the cosine decay")
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=f"runs/{METHOD}",
                   help="checkpoints and logs; resumed from if it holds last.pt")
    g.add_argument("--resume", default=None, help="checkpoint to start from when --output-dir has no last.pt")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on Ampere+ GPUs, fp16 on V100/T4, else fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: a slower start, faster steps")
    g.add_argument("--seed", type=common.at_least(0, high=2**32 - 1), default=0, help="random seed")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on CPU)")
    g.add_argument("--save-every", type=common.at_least(1), default=1, help="write last.pt every N epochs")
    g.add_argument("--log-every", type=common.at_least(1), default=50, help="log and print every N steps")
    g.add_argument("--knn-every", type=common.at_least(0), default=5,
                   help="kNN accuracy every N epochs and after the last (0 = never)")
    g.add_argument("--max-steps", type=common.at_least(1), default=None,
                   help="stop after N optimisation steps in all (mid-epoch: without that epoch's kNN)")
    return parser


RECIPES = {  # the defaults of the optimisation flags left unset (weight_decay_end None: constant decay)
    "resnet": dict(optimizer="lars", lr=0.3, min_lr=0.0, weight_decay=1e-6, weight_decay_end=None, clip_grad=0.0),
    "vit": dict(optimizer="adamw", lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0)}


def fill_recipe(args):
    """Set the optimisation flags left at None from a recipe, and the crop settings. The recipe is
    the backbone's, or the optimizer's when --optimizer lars or adamw is given (LARS at a ViT's
    lr 5e-4 would barely move, AdamW at lr 0.3 diverges)."""
    recipe = "vit" if args.arch.startswith("vit") else "resnet"
    recipe = {"lars": "resnet", "adamw": "vit"}.get(args.optimizer, recipe)
    for key, value in RECIPES[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.weight_decay_end is None:  # the ResNet recipe keeps its weight decay, the given one too
        args.weight_decay_end = args.weight_decay
    # main_dino.py's defaults for ViTs, (0.4, 1) and (0.05, 0.4); its advice without local crops, (0.14, 1); and
    # its README's ResNet-50 command, (0.14, 1) and (0.05, 0.14): a convnet's local crops stay smaller.
    vit = args.arch.startswith("vit")
    if args.global_crops_scale is None:
        args.global_crops_scale = (0.4, 1.0) if args.local_crops and vit else (0.14, 1.0)
    if args.local_crops_scale is None:
        args.local_crops_scale = (0.05, 0.4) if vit else (0.05, 0.14)
    if args.local_crop_size is None:  # 3/7 of the image, in whole ViT patches: 96 px of 224, 48 of 96, 16 of 32
        patch = (args.patch_size or default_patch_size(args.image_size)) if vit else 1
        step = patch * math.ceil(8 / patch)  # whole patches, 8 px at least: 8, 9 (3 px patches), 12 (6 px), 16
        args.local_crop_size = max(step, round(args.image_size * 3 / 7 / step) * step)
    for flag, (low, high) in (("global", args.global_crops_scale), ("local", args.local_crops_scale)):
        if not 0 < low <= high <= 1:
            common.fail(f"--{flag}-crops-scale {low} {high}: give the smallest then the largest fraction of the "
                        "image area a crop covers, 0 < smallest <= largest <= 1")
    if args.drop_path is None:
        args.drop_path = 0.1 if vit else 0.0
    if args.drop_path and not vit:  # it would be ignored, yet recorded in args.json
        common.fail(f"--drop-path applies to ViT backbones, not {args.arch}; drop it or use --arch vit_*")
    if args.grad_checkpointing and not vit:
        common.fail(f"--grad-checkpointing applies to ViT backbones, not {args.arch}; drop it or use --arch vit_*")


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


# ---- Model ---------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO's projection head (section 3.1, appendix C): a 3-layer MLP (hidden 2048, GELU) to a
    256-d bottleneck, L2 normalisation, then a weight-normalised linear layer without bias to
    out_dim prototypes: row k of its weight is g_k v_k / ||v_k||. With norm_last_layer, g stays 1."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach())
        # g is (out_dim, 1), as torch's weight_norm stores it: with --no-norm-last-layer the optimizers
        # see a matrix and give it weight decay (and LARS's trust ratio), as the official code does.
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


class MultiCropNet(nn.Module):
    """Backbone and head on a list of crops, as DINO's MultiCropWrapper: consecutive crops of the
    same size go through the backbone as one batch, and the head takes all the features at once.
    The output holds crop 0's B rows, then crop 1's, and so on."""

    def __init__(self, args, image_size, drop_path):
        super().__init__()
        self.backbone, self.backbone_meta = build_backbone(args.arch, image_size, args.patch_size, drop_path)
        self.head = DINOHead(self.backbone_meta["feat_dim"], args.out_dim, args.head_hidden_dim, args.bottleneck_dim,
                             args.norm_last_layer)

    def forward(self, crops):
        groups = itertools.groupby(crops, key=lambda x: x.shape[-2:])
        return self.head(torch.cat([self.backbone(torch.cat(list(same_size))) for _, same_size in groups]))


class DINO(nn.Module):
    """The student learns by gradient descent; the teacher, the same network without drop path,
    follows it as an exponential moving average and gets no gradients. `args` as fill_recipe leaves
    them (the ViT's --drop-path, say, is None until then)."""

    def __init__(self, args, image_size):
        super().__init__()
        self.student = MultiCropNet(args, image_size, args.drop_path)
        self.teacher = MultiCropNet(args, image_size, drop_path=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.student.backbone.grad_checkpointing = args.grad_checkpointing  # ViTs only (see fill_recipe)
        self.backbone_meta = self.student.backbone_meta

    def forward(self, crops):
        """Student outputs for every crop and teacher outputs for the two global ones. The teacher
        runs in train mode like the official code's (a ResNet teacher normalises with batch statistics)."""
        student_out = self.student(crops)
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        return student_out, teacher_out

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student (section 3.1), for the parameters only."""
        for student, teacher in zip(self.student.parameters(), self.teacher.parameters()):
            teacher.lerp_(student, 1.0 - momentum)


# ---- Loss ----------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """DINO's loss (section 3.1, eq. 2-3 and algorithm 1). The teacher distribution of a global
    crop is softmax((t - c) / T_t), centred by c and sharpened by a low T_t; the student's is
    softmax(s / T_s). The loss is the cross-entropy -sum_k P_t[k] log P_s[k], averaged over the
    batch and over every (teacher crop, student crop) pair of different views: 2 x (n_crops - 1)
    pairs. T_t rises linearly over the warm-up epochs (np.linspace, as the official code), then
    stays constant. After the loss, c <- m c + (1 - m) mean(t) over the global batch (all-reduced),
    so every process keeps the same centre. student_out holds n_crops blocks of B rows, global
    crops first; teacher_out the two global blocks."""

    def __init__(self, out_dim, n_crops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        # As the official np.linspace schedule; a warm-up longer than the run (where the official
        # code fails) simply stops where the run ends.
        self.warmup_epochs = warmup_teacher_temp_epochs
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch):
        if epoch >= self.warmup_epochs:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / max(
            1, self.warmup_epochs - 1)

    def forward(self, student_out, teacher_out, epoch):
        log_p_student = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(self.n_crops)
        log_p_teacher = F.log_softmax((teacher_out - self.center) / self.teacher_temperature(epoch), dim=-1)
        p_teacher = log_p_teacher.exp()
        # Logged, as the paper's figure 7 watches collapse: log(out_dim) for a uniform teacher, 0
        # when one dimension dominates; the loss minus this entropy is the mean KL(teacher || student).
        self.teacher_entropy = -(p_teacher * log_p_teacher).sum(-1).mean().detach()
        total, pairs = 0.0, 0
        for t, q in enumerate(p_teacher.detach().chunk(2)):
            for s, log_p in enumerate(log_p_student):
                if s != t:  # not the same view
                    total, pairs = total + (-q * log_p).sum(-1).mean(), pairs + 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out):
        batch_sum, count = teacher_out.sum(0, keepdim=True), len(teacher_out)
        if dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def teacher_momentum(step, total_steps, base):
    """Teacher momentum at step k of K (section 3.1): 1 - (1 - base)(cos(pi k / K) + 1) / 2, from
    base at the first step towards 1 at the last, updated every step."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


def clip_gradients(model, max_norm):
    """The official code clips each parameter's gradient to norm max_norm on its own (utils.py)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(torch.clamp(max_norm / (p.grad.norm() + 1e-6), max=1.0))


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

def train_one_epoch(model, raw_model, criterion, loader, optimizer, scaler, run, args):
    """Train on the rest of this epoch; return early on a stop signal or at run.end_step."""
    model.train()
    for crops, _ in loader:
        run.lr = cosine_schedule(run.step, run.total_steps, run.warmup_steps, run.base_lr, args.min_lr)
        wd = cosine_schedule(run.step, run.total_steps, 0, args.weight_decay, args.weight_decay_end)
        for g in optimizer.param_groups:
            g["lr"] = run.lr * g["lr_scale"]
        optimizer.param_groups[0]["weight_decay"] = wd  # the weights' group: biases and norms get none
        crops = [x.to(run.device, non_blocking=True, memory_format=run.memory_format) for x in crops]
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            student_out, teacher_out = model(crops)
        loss = criterion(student_out.float(), teacher_out.float(), run.epoch)  # in fp32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            clip_gradients(raw_model.student, args.clip_grad)
        if run.epoch < args.freeze_last_layer:  # prototypes fixed at first: training is more stable
            raw_model.student.head.last_v.grad = raw_model.student.head.last_g.grad = None
        scaler.step(optimizer)
        scaler.update()
        raw_model.update_teacher(teacher_momentum(run.step, run.total_steps, args.momentum_teacher))
        run.step += 1
        # [since the last row, this epoch] x [loss, teacher entropy]: read back only when logging
        run.losses += torch.stack([loss.detach(), criterion.teacher_entropy])
        run.n_row, run.n_epoch = run.n_row + 1, run.n_epoch + 1
        if run.step % args.log_every == 0:
            log_row(run, args, "step")
        if run.preemption.requested() or run.step >= run.end_step:
            return


def save_state(path, raw_model, criterion, optimizer, scaler, run, args):
    """Every process calls it (pending losses are averaged and checked first); rank 0 writes."""
    if run.n_row:
        log_row(run, args, "step")
    state = raw_model.state_dict()
    check_finite(state, run.step, path)  # every process: they stop together
    if run.is_main:
        check_last_writer(path, run.write_id)
        run.write_id = os.urandom(8).hex()  # this write's id, checked before the next one
        save_checkpoint({
            "method": METHOD, "args": vars(args), "step": run.step, "epoch": run.epoch,
            "model": state, "dino_loss": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_states(), "elapsed": run.elapsed + time.time() - run.t_start,
            "epoch_loss": [run.losses[1].tolist(), run.n_epoch],
            "backbone": raw_model.teacher.backbone.state_dict(), "backbone_meta": run.backbone_meta,
            "num_images": run.num_images, "write_id": run.write_id}, path)
        # The flags of the last.pt just written: another run started in the same folder (which stops at its
        # first save, above) wrote its own at its start.
        write_args(args, Path(path).parent)
    run.t_row = time.time()  # the next row's img/s counts training time, not this save


def check_resumable(ckpt, path, args, model, num_images):
    if ckpt.get("method") != METHOD:
        common.fail(f"{path} was written by {ckpt.get('method')}.py, not {METHOD}.py: resume from a "
                    f"{METHOD}.py checkpoint, or use another --output-dir")
    if "model" not in ckpt:
        common.fail(f"{path} holds only a backbone; resume from a last.pt, or evaluate it with linear_eval.py")
    # Checked: the data, structure and seed (the data order) of the run, and what the optimizer's saved
    # state carries (LARS eta and clip), which a changed flag could not alter.
    common.check_same_flags(path, ckpt["args"], args, (
        "dataset", "arch", "batch_size", "seed", "optimizer", "out_dim", "head_hidden_dim", "bottleneck_dim",
        "norm_last_layer", "image_size",
        *(("lars_eta", "lars_clip") if args.optimizer == "lars" else ())))
    if ckpt["backbone_meta"] != model.backbone_meta:
        common.fail(f"{path} holds a backbone {ckpt['backbone_meta']}, not {model.backbone_meta}: use the same "
                    "--arch, --patch-size and --image-size to resume, or another --output-dir")
    if ckpt.get("num_images", num_images) != num_images:  # another --data-dir, --synthetic-size, --val-fraction
        common.fail(f"{path} was trained on {ckpt['num_images']} images, these data hold {num_images}: use the same "
                    "images to resume, or another --output-dir")
    common.check_same_model(path, ckpt["model"], model)  # names and shapes: a checkpoint of another version


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

    # 2. Output directory, and the checkpoint to resume from --------------------------------
    out, last = Path(args.output_dir), Path(args.output_dir) / "last.pt"
    if is_main:
        check_writable(out)
    resume_from = last if last.exists() else args.resume  # last.pt first: a requeued job continues its own run
    if is_main and args.resume and last.exists() and Path(args.resume).resolve() != last.resolve():
        print(f"note: --resume {args.resume} is not used: {last} exists and the run continues from it", flush=True)
    ckpt = load_checkpoint(resume_from) if resume_from else None
    if ckpt:  # before the data: a folder resumed without its --dataset would download or load another
        common.check_same_flags(resume_from, ckpt.get("args", {}), args, ("dataset",))
        saved = ckpt.get("args", {})
        if "arch" in saved and not saved["arch"].startswith("vit"):  # recorded as 0.1 until 2026-12-07: ignored
            saved["drop_path"] = 0.0
        if args.image_size is None:  # the checkpoint's, not the data's default (its rule may have changed)
            args.image_size = ckpt.get("args", {}).get("image_size")

    # 3. Data --------------------------------------------------------------------------------
    if is_main:
        common.download_data(args)  # rank 0 downloads while the others wait
    wait_for_rank0(world_size, preemption.group)
    data = common.load_data(args)
    args.image_size = data.image_size
    given_local = args.local_crop_size is not None  # for the error below: its default cannot always fit
    fill_recipe(args)
    views = common.dino_augmentations(data.image_size, data.mean, data.std, args.local_crops, args.local_crop_size,
                                      args.global_crops_scale, args.local_crops_scale)
    local_batch = args.batch_size // world_size
    loader = common.pretrain_loader(data.pretrain, views, local_batch, world_size, rank, args, device)
    steps_per_epoch = len(loader)
    if args.batch_size > len(data.pretrain) or steps_per_epoch == 0:
        common.fail(f"--batch-size {args.batch_size} is larger than the {len(data.pretrain)} training images; lower it")

    # 4. Model, loss, optimizer, mixed precision ------------------------------------------------
    raw_model = DINO(args, data.image_size).to(device)
    if ckpt:
        check_resumable(ckpt, resume_from, args, raw_model, len(data.pretrain))
        common.check_not_past_end(resume_from, ckpt["step"], steps_per_epoch, args)
    patch = raw_model.backbone_meta.get("patch_size", 1)
    if args.local_crops and args.local_crop_size % patch:
        common.fail(f"--local-crop-size {args.local_crop_size} is not a multiple of the ViT patch size {patch}; "
                    "change it")
    if args.local_crops and args.local_crop_size >= data.image_size:  # multi-crop: small local views (sec. 3.1)
        common.fail(f"--local-crop-size {args.local_crop_size} is not smaller than the {data.image_size} px global "
                    + ("crops; give a smaller one, or leave it out (3/7 of the image size)" if given_local else
                       "crops (its default, 3/7 of the image size in whole patches, 8 px at least, cannot be); "
                       "give a larger --image-size, or --local-crops 0"))
    if world_size > 1:
        raw_model = convert_sync_batchnorm(raw_model, device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = raw_model = raw_model.to(memory_format=memory_format)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(raw_model)
    if args.compile:  # raw_model stays the plain module: it is what gets saved
        model = torch.compile(model)
    criterion = DINOLoss(args.out_dim, 2 + args.local_crops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.student_temp, args.center_momentum).to(device)
    optimizer = make_optimizer(raw_model.parameters(), args)  # the student: the teacher needs no grad
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # 5. Run state, resumed from the checkpoint ----------------------------------------------
    run = argparse.Namespace(  # what changes during the run, shared by the loop and the logger
        device=device, amp_dtype=amp_dtype, memory_format=memory_format, is_main=is_main, world_size=world_size,
        step=0, epoch=0, lr=0.0, elapsed=0.0, n_row=0, n_epoch=0, losses=torch.zeros(2, 2, device=device),
        base_lr=args.lr * args.batch_size / 256, total_steps=args.epochs * steps_per_epoch,
        warmup_steps=args.warmup_epochs * steps_per_epoch, preemption=preemption,
        backbone_meta=raw_model.backbone_meta, num_images=len(data.pretrain),
        write_id=ckpt.get("write_id") if resume_from is last else None)  # the last.pt read: see check_last_writer
    run.end_step = min(run.total_steps, args.max_steps or run.total_steps)
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        criterion.load_state_dict(ckpt["dino_loss"])  # the centre
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved without fp16: a fresh scaler then starts the scaling
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        run.step, run.elapsed, (epoch_sums, run.n_epoch) = ckpt["step"], ckpt["elapsed"], ckpt["epoch_loss"]
        # the learning rate of the last step, for an epoch row postponed to this run (below)
        run.lr = cosine_schedule(max(run.step - 1, 0), run.total_steps, run.warmup_steps, run.base_lr, args.min_lr)
        run.epoch = ckpt["epoch"]  # kept if no epoch is left to train: rerunning a finished run saves it again
        run.losses[1] = torch.tensor(epoch_sums)
    # A stop asked for at an epoch's last step or during its kNN leaves no time for the kNN: that epoch's
    # end (kNN and epoch row) is postponed, and the resumed run does it first, over an empty rest of the epoch.
    postponed = run.n_epoch > 0 and run.step % steps_per_epoch == 0
    if is_main and run.warmup_steps >= run.total_steps:  # a short run with the recipe's warm-up: say so
        print(f"warning: --warmup-epochs {args.warmup_epochs} covers the whole run: the learning rate rises "
              f"toward {run.base_lr:.4g} all run long and never decays; lower --warmup-epochs for a short run",
              file=sys.stderr, flush=True)
    if ckpt and run.step >= run.end_step:  # a finished run started again (its postponed epoch end left at most)
        common.keep_trained_flags(resume_from, ckpt["args"], args, is_main)
    if is_main:
        fields = [*FIELDS, "teacher_entropy"]  # the last column: the losses' second entry
        if ckpt:
            common.note_changed_flags(resume_from, ckpt["args"], args)
        # the rows of the run resumed, if its own: another run's (left by a lost last.pt) go
        run.logger = CSVLogger(out / "metrics.csv", fields, resume_step=run.step if resume_from is last else None,
                               postponed=postponed)
        write_args(args, out)
        print(f"{f'resumed from {resume_from} at step {run.step}' if ckpt else 'new run'}: "
              f"{len(data.pretrain)} images at {args.image_size} px{'' if data.train else ' (unlabeled: no kNN)'}, "
              f"{world_size} process(es) on {device.type}, {args.precision}, "
              f"{steps_per_epoch} steps/epoch; {args.arch}, {args.optimizer} lr {args.lr}, "
              f"2 + {args.local_crops} crops", flush=True)

    # 6. Train -------------------------------------------------------------------------------
    run.t_start = run.t_row = time.time()
    for epoch in range(run.step // steps_per_epoch - postponed, args.epochs):
        if run.step >= run.end_step and not postponed:
            break
        postponed = False
        run.epoch, run.t_epoch, run.epoch_step0 = epoch, time.time(), run.step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the logged peak memory is this epoch's
        loader.sampler.set_epoch(epoch, skip=(run.step - epoch * steps_per_epoch) * local_batch)
        train_one_epoch(model, raw_model, criterion, loader, optimizer, scaler, run, args)
        stopping = run.preemption.requested()
        if run.step == (epoch + 1) * steps_per_epoch:  # the epoch is complete
            if device.type == "cuda":  # the last step's GPU work ends before the kNN's clock starts
                torch.cuda.synchronize(device)
            if run.n_row:  # the row of the epoch's last steps, its time_s that of its last step, not after the kNN
                log_row(run, args, "step")
            knn, t_knn = None, time.time()
            knn_due = data.train and args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs)
            if knn_due and not stopping:  # a stop asked for during the kNN cuts it short (None)
                knn = knn_accuracy(raw_model.teacher.backbone, data, args, device, rank, world_size,
                                   run.preemption.requested)
            if knn_due and knn is None:
                break  # postponed (above): saved with this epoch's losses, its row not yet written
            stopping = run.preemption.requested()  # a signal after the kNN's last check: save once, below
            t_knn = time.time() - t_knn
            run.t_epoch, run.t_row = run.t_epoch + t_knn, run.t_row + t_knn  # img/s counts training time only
            log_row(run, args, "epoch", knn)
            run.losses[1], run.n_epoch = 0.0, 0
            if (epoch + 1) % args.save_every == 0 and not stopping and run.step < run.end_step:  # the end: once, below
                save_state(last, raw_model, criterion, optimizer, scaler, run, args)
        if stopping:
            break

    # 7. Save last.pt; on a signal exit (and requeue), at the end also write backbone.pt ----
    save_state(last, raw_model, criterion, optimizer, scaler, run, args)
    # Complete (its last epoch's end not postponed): a signal now finds nothing to resume, and writing
    # backbone.pt takes a second, so the run ends as planned instead of requeueing a job to write it.
    complete = run.step >= run.end_step and not (run.n_epoch > 0 and run.step % steps_per_epoch == 0)
    stopped = run.preemption.requested()  # all processes agree on how to end
    if stopped and not complete:
        run.preemption.exit(is_main, f"stopped at step {run.step}, saved {last}", out)
    if is_main:  # the teacher's backbone: DINO evaluates the teacher (its eval scripts' checkpoint_key)
        save_checkpoint({"method": METHOD, "args": vars(args), "backbone": raw_model.teacher.backbone.state_dict(),
                         "backbone_meta": run.backbone_meta}, out / "backbone.pt")
        late = " (the stop signal came after the last step: not requeued)" if stopped else ""
        print(f"done at step {run.step}: {last} and {out / 'backbone.pt'}{late}", flush=True)
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
