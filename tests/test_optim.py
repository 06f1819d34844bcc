"""LARS against hand-computed steps, the learning-rate schedule, the optimizer choices."""
import argparse
import math

import pytest
import torch

from simclr import LARS, cosine_schedule, make_optimizer


def test_lars_hand_computed_two_steps():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.001)
    w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    # Weight: u = g + 0.1 w = (0.9, 1.2), ||u|| = 1.5, trust ratio 0.001 * 5 / 1.5 = 1/300,
    # momentum buffer = u / 300 = (0.003, 0.004), w <- w - 0.5 * buffer.
    assert torch.allclose(w, torch.tensor([[2.9985, 3.998]], dtype=torch.float64), atol=1e-12)
    # Bias (1-D): no weight decay, no trust ratio: plain SGD momentum.
    assert torch.allclose(b, torch.tensor([0.75], dtype=torch.float64), atol=1e-12)
    opt.step()  # same gradients again
    u = [0.6 + 0.1 * 2.9985, 0.8 + 0.1 * 3.998]
    ratio = 0.001 * math.hypot(2.9985, 3.998) / math.hypot(*u)
    mu = [0.9 * 0.003 + ratio * u[0], 0.9 * 0.004 + ratio * u[1]]
    expected = [2.9985 - 0.5 * mu[0], 3.998 - 0.5 * mu[1]]
    assert torch.allclose(w, torch.tensor([expected], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, torch.tensor([0.75 - 0.5 * (0.9 * 0.5 + 0.5)], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("clip,lr,step", [(False, 0.5, 0.5 / 30), (True, 0.5, 1 / 30), (True, 0.01, 0.01)])
def test_lars_trust_ratio_and_clip_as_solo_learn(clip, lr, step):
    """A gradient orthogonal to the weights (where ||g|| + wd ||w|| and ||g + wd w|| differ):
    r = eta ||w|| / (||g|| + wd ||w||) = 0.01 * 5 / (1 + 0.1 * 5) = 1/30, and the weights move by
    (g + wd w) times lr * r without clip, min(r, lr) with solo-learn's clip_lr."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([w], lr=lr, momentum=0.9, weight_decay=0.1, eta=0.01, clip=clip)
    w.grad = torch.tensor([[0.8, -0.6]], dtype=torch.float64)
    opt.step()
    u = torch.tensor([[0.8 + 0.3, -0.6 + 0.4]], dtype=torch.float64)
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]], dtype=torch.float64) - step * u, atol=1e-12)


def test_lars_state_without_clip_steps_unclipped():
    """Optimizer states saved before the clip existed resume as they were trained: unclipped."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01, clip=True)
    state = opt.state_dict()
    del state["param_groups"][0]["clip"]
    opt.load_state_dict(state)
    w.grad = torch.tensor([[0.8, -0.6]], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w, torch.tensor([[3.0 - 1.1 / 60, 4.0 + 0.2 / 60]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
def test_lars_zero_weight_or_gradient_is_plain_sgd_as_solo_learn(clip):
    """solo-learn applies weight decay and the trust ratio only where ||w|| > 0 and ||g|| > 0:
    a zero weight takes the plain gradient step (with the clip too, at lr above 1), and a zero
    gradient leaves the weights as they are (no weight decay alone)."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=2.0, momentum=0.0, weight_decay=0.1, eta=0.001, clip=clip)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(w, -2 * torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)
    opt.step()
    assert torch.allclose(w, -2 * torch.ones(2, 2)) and torch.equal(opt.state[w]["mu"], torch.zeros(2, 2))


def test_lars_state_round_trip():
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = LARS([w], lr=0.1)
    w.grad = torch.randn(3, 3)
    opt.step()
    opt2 = LARS([w], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[w]["mu"], opt.state[w]["mu"])


def test_cosine_schedule():
    base, warm, total = 0.4, 10, 110
    assert cosine_schedule(0, total, warm, base) == pytest.approx(base / warm)
    assert cosine_schedule(9, total, warm, base) == pytest.approx(base)
    assert cosine_schedule(10, total, warm, base) == pytest.approx(base)
    assert cosine_schedule(60, total, warm, base) == pytest.approx(base / 2)
    assert cosine_schedule(110, total, warm, base) == pytest.approx(0.0)
    assert cosine_schedule(500, total, warm, base) == pytest.approx(0.0)
    # BYOL/DINO use it from base to 1 without warm-up: 1 - (1 - base) (cos(pi k / K) + 1) / 2.
    k, big_k = 30, 100
    assert cosine_schedule(k, big_k, 0, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / big_k) + 1) / 2)


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_make_optimizer_excludes_1d_from_weight_decay(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = make_optimizer(model.parameters(), argparse.Namespace(optimizer=name, weight_decay=0.5, lars_eta=0.02,
                                                                lars_clip=True))
    assert isinstance(opt, cls) and (name != "lars" or opt.param_groups[0]["clip"] is True)
    decayed, plain = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.5
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_lr_biases_scales_the_1d_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    args = argparse.Namespace(optimizer="lars", weight_decay=1e-4, lars_eta=0.02, lars_clip=True, lr=0.2,
                              lr_biases=0.0048)
    weights, biases = make_optimizer(model.parameters(), args).param_groups
    assert weights["lr_scale"] == 1.0 and biases["lr_scale"] == pytest.approx(0.024)
    del args.lr_biases  # scripts without the flag: one learning rate for all
    assert [g["lr_scale"] for g in make_optimizer(model.parameters(), args).param_groups] == [1.0, 1.0]


def test_lr_biases_zero_freezes_the_1d_group_and_needs_a_weights_lr():
    """--lr-biases 0 is a value (biases and norms not trained), not "unset"; with --lr 0 there is no
    schedule to take a fraction of: one line."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    args = argparse.Namespace(optimizer="lars", weight_decay=1e-4, lars_eta=0.02, lars_clip=True, lr=0.2, lr_biases=0.0)
    assert [g["lr_scale"] for g in make_optimizer(model.parameters(), args).param_groups] == [1.0, 0.0]
    args.lr = 0.0
    with pytest.raises(SystemExit, match="--lr-biases needs a --lr above 0"):
        make_optimizer(model.parameters(), args)


def test_lars_momentum_buffer_is_independent_of_the_learning_rate():
    """LARS with a learning rate that changes between steps (warm-up, cosine): the momentum buffer
    accumulates the unscaled update and the step is lr x buffer, as the official Barlow Twins / BYOL
    LARS (and torch's SGD in solo-learn) do, not a buffer of lr-scaled updates."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.001)
    gw, gb = torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()  # lr 0.5: as test_optim's first step
    assert torch.allclose(w, torch.tensor([[2.9985, 3.998]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, torch.tensor([0.75], dtype=torch.float64), atol=1e-12)
    for g in opt.param_groups:
        g["lr"] = 0.1  # the schedule moves on
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # Bias: mu = 0.9 * 0.5 + 0.5 = 0.95, b = 0.75 - 0.1 * 0.95.
    assert torch.allclose(b, torch.tensor([0.75 - 0.1 * 0.95], dtype=torch.float64), atol=1e-12)
    u = [0.6 + 0.1 * 2.9985, 0.8 + 0.1 * 3.998]
    ratio = 0.001 * math.hypot(2.9985, 3.998) / (1.0 + 0.1 * math.hypot(2.9985, 3.998))
    mu = [0.9 * 0.003 + ratio * u[0], 0.9 * 0.004 + ratio * u[1]]
    assert torch.allclose(w, torch.tensor([[2.9985 - 0.1 * mu[0], 3.998 - 0.1 * mu[1]]], dtype=torch.float64),
                          atol=1e-12)
