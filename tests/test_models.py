"""Each method's heads have the layers its paper and official code describe. The loss and step tests
build their expected values from the model itself, so a wrong layer, width or initialisation passes
them: found by mutating the heads (a dropped BatchNorm, biases, the predictor's width)."""
import argparse

import torch
import torch.nn as nn

import barlow
import byol
import dino
import simclr


def kinds(seq):
    return [type(m).__name__ for m in seq]


def test_simclr_projector_has_batchnorm_and_relu_between_its_layers():
    for layers in (1, 2, 3):
        args = simclr.get_args_parser().parse_args(["--proj-hidden-dim", "24", "--proj-dim", "16",
                                                    "--proj-layers", str(layers)])
        head = simclr.SimCLR(args, 8).projector
        assert kinds(head) == ["Linear", "BatchNorm1d", "ReLU"] * (layers - 1) + ["Linear"]
        assert head[-1].out_features == 16 and all(m.out_features == 24 for m in head[:-1] if isinstance(m, nn.Linear))


def test_byol_projector_and_predictor_have_their_own_widths():
    """Section 3.3: Linear, BatchNorm, ReLU, Linear, for both; the predictor's hidden width is
    --pred-hidden-dim (here unlike --proj-hidden-dim), its input and output the projection's."""
    args = byol.get_args_parser().parse_args(["--proj-hidden-dim", "24", "--pred-hidden-dim", "40", "--proj-dim", "16"])
    model = byol.BYOL(args, 8)
    projector, predictor = model.online.projector, model.predictor
    assert kinds(projector) == kinds(predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (projector[0].out_features, projector[3].out_features) == (24, 16)
    assert (predictor[0].in_features, predictor[0].out_features, predictor[3].out_features) == (16, 40, 16)
    assert kinds(model.target.projector) == kinds(projector)


def test_barlow_projector_is_three_layers_without_biases():
    args = barlow.get_args_parser().parse_args(["--proj-hidden-dim", "24", "--proj-dim", "16"])
    head = barlow.BarlowTwins(args, 8).projector
    assert kinds(head) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear)) and head[-1].out_features == 16


def test_dino_head_is_initialised_as_the_official_code():
    """trunc_normal(std 0.02) weights and zero biases in the MLP; a GELU between its layers."""
    torch.manual_seed(0)
    head = dino.DINOHead(192, 64, 256, 32, norm_last_layer=True)
    assert kinds(head.mlp) == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert abs(m.weight.std().item() - 0.02) < 0.002  # truncated at +-2, as timm's: in effect a normal
    assert head.last_v.shape == (64, 32) and torch.equal(head.last_g, torch.ones(64, 1))


def test_dino_crops_of_one_size_go_through_the_backbone_together():
    """A ResNet in train mode: BatchNorm normalises the global crops with their joint statistics, and
    the local crops with theirs (as DINO's MultiCropWrapper), not crop by crop."""
    args = argparse.Namespace(arch="resnet18", patch_size=None, out_dim=16, head_hidden_dim=16, bottleneck_dim=8,
                              norm_last_layer=True)
    torch.manual_seed(0)
    net = dino.MultiCropNet(args, 16, 0.0).train()
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        out = net(crops)
        expected = net.head(torch.cat([net.backbone(torch.cat(crops[:2])), net.backbone(torch.cat(crops[2:]))]))
        one_by_one = net.head(torch.cat([net.backbone(c) for c in crops]))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, one_by_one, atol=1e-3)
