"""byol_loss, ema_tau and the target update; barlow_twins_loss against a naive implementation,
hand-computed values and its invariants."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from barlow import barlow_twins_loss
from byol import BYOL, byol_loss, ema_tau

# ---- BYOL


def test_byol_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    # cos = 0 and 1/sqrt(2): mean of 2 - 0 and 2 - sqrt(2).
    assert byol_loss(p, z).item() == pytest.approx((2 + 2 - math.sqrt(2)) / 2, abs=1e-12)
    assert byol_loss(p, -p).item() == pytest.approx(4.0)


def test_byol_loss_invariances_and_stop_gradient():
    torch.manual_seed(0)
    p, z = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    assert byol_loss(p, p.detach()).item() == pytest.approx(0.0, abs=1e-6)  # identical p and z
    assert torch.allclose(byol_loss(p * 3.0, z * 0.5), byol_loss(p, z))  # scale invariance
    (byol_loss(p, z) + byol_loss(z, p)).backward()
    # Each call lets the gradient through its first argument only: both got one here.
    assert p.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    z2 = torch.randn(8, 16, requires_grad=True)
    byol_loss(p, z2).backward()
    assert z2.grad is None  # the target projection gets no gradient


def test_ema_tau_schedule():
    assert ema_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert ema_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_tau(100, 100, 0.99) == pytest.approx(1.0)
    k, big_k = 17, 100
    assert ema_tau(k, big_k, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / big_k) + 1) / 2)
    taus = [ema_tau(k, 100, 0.9) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))  # increases to 1


def test_target_is_an_ema_of_the_online_network_parameters():
    args = argparse.Namespace(arch="resnet18", patch_size=None, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    model = BYOL(args, 32)
    assert all(not p.requires_grad for p in model.target.parameters())
    for o, t in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(o, t)  # starts as a copy
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(1.0)
        for b in model.online.buffers():
            b.add_(1)
    before = [t.clone() for t in model.target.parameters()]
    buffers = [b.clone() for b in model.target.buffers()]
    model.update_target(0.9)
    for t0, o, t in zip(before, model.online.parameters(), model.target.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.target.buffers()))  # parameters only
    model.train()
    p1, p2, z1, z2 = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert p1.shape == z2.shape == (4, 16) and not z1.requires_grad and p1.requires_grad

# ---- Barlow Twins


def naive_barlow(z1, z2, lambd):
    """Written from the paper with BatchNorm(affine=False) and explicit loops over C."""
    bn = lambda z: F.batch_norm(z, None, None, training=True, eps=1e-5)  # noqa: E731
    c = bn(z1).T @ bn(z2) / len(z1)
    d = c.shape[0]
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def test_barlow_matches_naive():
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    assert torch.allclose(barlow_twins_loss(z1, z2, 0.0051), naive_barlow(z1, z2, 0.0051), atol=1e-10)


def test_barlow_gradients_match_naive():
    """The gradient flows through the batch mean and variance too, as through BatchNorm (the value
    alone would not see them detached)."""
    torch.manual_seed(2)
    z1, z2 = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    grads = []
    for loss in (barlow_twins_loss, naive_barlow):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss(a, b, 0.0051).backward()
        grads.append((a.grad, b.grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_barlow_hand_computed():
    # Two orthogonal +-1 columns: already standardised (mean 0, variance 1) and uncorrelated.
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    shrink = 1 / (1 + 1e-5)  # BatchNorm's eps: each entry of C is 1 / (1 + eps) instead of 1
    # Perfectly correlated views with decorrelated dimensions: C = I, loss 0 (up to eps).
    assert barlow_twins_loss(z, z, 0.0051).item() == pytest.approx(2 * (1 - shrink) ** 2, abs=1e-12)
    # Swapped dimensions: C = [[0, 1], [1, 0]]: diagonal term 2, off-diagonal term 2 * lambd.
    assert barlow_twins_loss(z, z[:, [1, 0]], 0.5).item() == pytest.approx(2 + 0.5 * 2 * shrink ** 2, abs=1e-9)


def test_barlow_invariances():
    torch.manual_seed(1)
    z1, z2 = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    loss = barlow_twins_loss(z1, z2, 0.01)
    assert torch.allclose(barlow_twins_loss(z2, z1, 0.01), loss)  # symmetric (C becomes C^T)
    scale, shift = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    assert torch.allclose(barlow_twins_loss(z1 * scale + shift, z2, 0.01), loss, atol=1e-8)  # standardised
    perm = torch.randperm(32)
    assert torch.allclose(barlow_twins_loss(z1[perm], z2[perm], 0.01), loss)  # order of images
    assert not torch.allclose(barlow_twins_loss(z1, z2[perm], 0.01), loss)  # but pairing matters
    assert barlow_twins_loss(z1, z1, 0.01) < loss
