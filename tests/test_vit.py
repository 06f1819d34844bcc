"""Vision Transformers of the shared Backbone block: every size runs forward and backward, the
position embeddings follow the input size, drop path and gradient checkpointing behave."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from simclr import VIT_SIZES, build_backbone, drop_path


@pytest.mark.parametrize("arch", list(VIT_SIZES))
def test_every_vit_size_runs_forward_and_backward(arch):
    torch.manual_seed(0)
    net, meta = build_backbone(arch, 16, patch_size=8)
    dim, depth, heads = VIT_SIZES[arch]
    assert meta == {"arch": arch, "image_size": 16, "patch_size": 8, "feat_dim": dim}
    assert len(net.blocks) == depth and net.blocks[0].heads == heads
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.pos_embed.grad.abs().sum() > 0 and net.cls_token.grad.abs().sum() > 0


def test_parameter_count_of_vit_small_matches_the_reference():
    """ViT-S/16 on 224 px: 21.7M parameters without a classifier (DINO's table, 21M)."""
    net, _ = build_backbone("vit_small", 224)
    assert sum(p.numel() for p in net.parameters()) == 21_665_664


@pytest.mark.parametrize("size,patch", [(32, 4), (64, 8), (96, 16), (224, 16)])
def test_default_patch_size_follows_the_image_size(size, patch):
    assert build_backbone("vit_tiny", size)[1]["patch_size"] == patch


@pytest.mark.parametrize("size,patch", [(8, 16), (30, 4), (32, 5)])
def test_image_not_a_multiple_of_the_patch_is_one_clear_error(size, patch):
    """A patch larger than the image, or one that leaves pixels over (the patch convolution would
    drop them without a word)."""
    with pytest.raises(SystemExit, match=f"--image-size {size} is not a multiple of the ViT patch size {patch}"):
        build_backbone("vit_tiny", size, patch_size=patch)


def test_position_embeddings_are_interpolated_for_other_input_sizes():
    torch.manual_seed(1)
    net, _ = build_backbone("vit_tiny", 32, patch_size=4)  # an 8x8 grid
    assert net.position_embeddings(8, 8) is net.pos_embed
    pos = net.position_embeddings(4, 4)  # a 16 px local crop
    assert pos.shape == (1, 17, 192) and torch.equal(pos[:, 0], net.pos_embed[:, 0])
    grid = net.pos_embed[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(pos[:, 1:], expected)
    assert net.eval()(torch.randn(3, 3, 16, 16)).shape == (3, 192)
    assert net(torch.randn(1, 3, 48, 48)).shape == (1, 192)  # larger than trained: 12x12 patches


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(2)
    x = torch.ones(20000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert per_sample[:, 0].unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]
    assert (per_sample == per_sample[:, :1]).all()  # a sample is dropped as a whole
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert drop_path(x, 0.25, training=False) is x


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass while running fn (the activation
    memory; non-reentrant checkpointing keeps its own inputs outside of this count's hooks only)."""
    total, seen = [0], set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_gradient_checkpointing_same_loss_and_gradients_less_memory():
    torch.manual_seed(3)
    net, _ = build_backbone("vit_tiny", 32, patch_size=4, drop_path=0.2)
    x = torch.randn(8, 3, 32, 32)
    results = {}
    for ckpt in (False, True):
        net.grad_checkpointing = ckpt
        net.zero_grad()
        torch.manual_seed(4)  # the same drop-path masks (checkpoint replays the RNG state)
        out, mem = saved_bytes(lambda: net(x))
        loss = out.square().mean()
        loss.backward()
        results[ckpt] = loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, mem
    (l0, g0, m0), (l1, g1, m1) = results[False], results[True]
    assert torch.equal(l0, l1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-7), name
    assert m1 < m0 / 4, (m0, m1)  # 12 blocks' activations against their 12 inputs


@pytest.mark.parametrize("arch,size,local,patch", [
    ("vit_tiny", 32, 16, None), ("vit_tiny", 64, 24, None), ("vit_tiny", 96, 48, None), ("vit_tiny", 224, 96, None),
    ("resnet18", 96, 40, None), ("resnet18", 32, 16, None),
    # A patch that does not divide 8 px: whole patches still (the default was a multiple of 8, refused).
    ("vit_tiny", 24, 12, 6), ("vit_tiny", 24, 9, 3), ("vit_tiny", 20, 10, 5), ("vit_tiny", 28, 14, 7)])
def test_dino_default_local_crop_is_whole_patches(arch, size, local, patch):
    """3/7 of the image side (DINO: 96 of 224 px), in whole patches (8 px at least) of the patch size."""
    import dino
    args = dino.get_args_parser().parse_args(["--arch", arch, "--local-crops", "2",
                                              *(["--patch-size", str(patch)] if patch else [])])
    args.image_size = size
    dino.fill_recipe(args)
    assert args.local_crop_size == local and args.local_crop_size % (patch or 1) == 0 and local < size


@pytest.mark.parametrize("arch,local_crops,expected", [
    ("vit_tiny", 6, ((0.4, 1.0), (0.05, 0.4))), ("vit_tiny", 0, ((0.14, 1.0), (0.05, 0.4))),  # main_dino.py
    ("resnet18", 6, ((0.14, 1.0), (0.05, 0.14))), ("resnet18", 0, ((0.14, 1.0), (0.05, 0.14)))])  # its ResNet-50 recipe
def test_dino_default_crop_scales_follow_the_backbone(arch, local_crops, expected):
    import dino
    args = dino.get_args_parser().parse_args(["--arch", arch, "--local-crops", str(local_crops)])
    args.image_size = 32
    dino.fill_recipe(args)
    assert (tuple(args.global_crops_scale), tuple(args.local_crops_scale)) == expected
    given = dino.get_args_parser().parse_args(["--arch", arch, "--local-crops-scale", "0.1", "0.3"])
    given.image_size = 32
    dino.fill_recipe(given)
    assert tuple(given.local_crops_scale) == (0.1, 0.3)


@pytest.mark.parametrize("flags,expected", [
    ([], ("lars", 0.3, 0.0, 1e-6, 1e-6, 0.0)),
    (["--arch", "vit_tiny"], ("adamw", 5e-4, 1e-6, 0.04, 0.4, 3.0)),  # main_dino.py's min_lr 1e-6
    (["--weight-decay", "1e-4"], ("lars", 0.3, 0.0, 1e-4, 1e-4, 0.0)),  # the ResNet recipe's decay stays constant
    (["--arch", "vit_tiny", "--weight-decay", "0.05"], ("adamw", 5e-4, 1e-6, 0.05, 0.4, 3.0)),
    (["--optimizer", "adamw"], ("adamw", 5e-4, 1e-6, 0.04, 0.4, 3.0)),  # AdamW's settings, not LARS's lr 0.3
    (["--arch", "vit_tiny", "--optimizer", "lars"], ("lars", 0.3, 0.0, 1e-6, 1e-6, 0.0)),
    (["--optimizer", "sgd", "--lr", "0.03"], ("sgd", 0.03, 0.0, 1e-6, 1e-6, 0.0)),  # sgd: the backbone's recipe
    (["--arch", "vit_tiny", "--min-lr", "0"], ("adamw", 5e-4, 0.0, 0.04, 0.4, 3.0)),
])
def test_dino_unset_optimisation_flags_follow_the_backbone_or_the_optimizer(flags, expected):
    import dino
    args = dino.get_args_parser().parse_args(flags)
    args.image_size = 32
    dino.fill_recipe(args)
    assert (args.optimizer, args.lr, args.min_lr, args.weight_decay, args.weight_decay_end, args.clip_grad) == expected


def test_dino_learning_rate_decays_to_min_lr(tmp_path):
    """--min-lr is where the cosine ends (main_dino.py's min_lr), not 0: the logged rate of the
    last of 4 steps (step index 3) is min_lr + (base - min_lr) (1 + cos(3 pi / 4)) / 2."""
    from conftest import METHODS, TINY, run_script
    run_script("dino.py", *TINY, *METHODS["dino.py"], "--epochs", "1", "--warmup-epochs", "0", "--knn-every", "0",
               "--log-every", "1", "--lr", "0.8", "--min-lr", "0.05", "--output-dir", tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["kind"] == "step"]
    base = 0.8 * 32 / 256
    expected = [0.05 + (base - 0.05) * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
