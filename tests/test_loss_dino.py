"""DINO: the loss against a naive per-sample computation and hand-computed values, the teacher
temperature schedule, the centre update, the head, the teacher EMA and the multi-crop pipeline."""
import argparse
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import METHODS, TINY, load, run_script
from dino import DINO, DINOHead, DINOLoss, MultiCropNet, clip_gradients, teacher_momentum


def naive_dino_loss(student, teacher, center, n_crops, t_temp, s_temp=0.1):
    """Python loops over samples and pairs, straight from algorithm 1 of the paper."""
    b = len(teacher) // 2
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(n_crops):
            if s == t:
                continue
            for i in range(b):
                q = [math.exp(v) for v in ((teacher[t * b + i] - center) / t_temp).tolist()]
                q = [v / sum(q) for v in q]
                logits = (student[s * b + i] / s_temp).tolist()
                log_z = math.log(sum(math.exp(v) for v in logits))
                total += -sum(qk * (lk - log_z) for qk, lk in zip(q, logits)) / b
            pairs += 1
    return total / pairs


def make_loss(n_crops=4, **kw):
    args = dict(out_dim=6, n_crops=n_crops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    args.update(kw)
    return DINOLoss(**args).double()


def test_loss_matches_the_naive_definition_with_a_centre():
    torch.manual_seed(0)
    loss = make_loss()
    loss.center.copy_(torch.randn(1, 6, dtype=torch.float64) * 0.1)
    center = loss.center[0].clone()
    student, teacher = torch.randn(4 * 3, 6, dtype=torch.float64), torch.randn(2 * 3, 6, dtype=torch.float64)
    value = loss(student, teacher, epoch=5)  # after the warm-up: T_t = 0.07
    assert value.item() == pytest.approx(naive_dino_loss(student, teacher, center, 4, 0.07), rel=1e-10)


def test_loss_hand_computed():
    """One sample, two crops, two prototypes: only the pairs (teacher 0, student 1) and (1, 0)."""
    loss = make_loss(n_crops=2, out_dim=2, warmup_teacher_temp_epochs=0, teacher_temp=1.0, student_temp=1.0)
    student = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=torch.float64)  # P_s: (1/2, 1/2), (3/4, 1/4)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], dtype=torch.float64)  # P_t: (3/4, 1/4), (1/2, 1/2)
    expected = (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - (0.5 * math.log(0.5) * 2)) / 2
    assert loss(student, teacher, epoch=0).item() == pytest.approx(expected, rel=1e-12)


def entropy(*p):
    return -sum(v * math.log(v) for v in p)


def test_teacher_entropy_is_logged_and_the_rest_of_the_loss_is_the_kl():
    """In the hand-computed case: H(3/4, 1/4) and H(1/2, 1/2) averaged; with the student equal to
    the teacher on every crop, loss = entropy (KL 0); a uniform teacher gives log(out_dim)."""
    loss = make_loss(n_crops=2, out_dim=2, warmup_teacher_temp_epochs=0, teacher_temp=1.0, student_temp=1.0,
                     center_momentum=1.0)  # the centre stays 0
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], dtype=torch.float64)
    loss(torch.zeros(2, 2, dtype=torch.float64), teacher, epoch=0)
    assert loss.teacher_entropy.item() == pytest.approx((entropy(0.75, 0.25) + entropy(0.5, 0.5)) / 2, rel=1e-12)
    same = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # both crops: the same uniform output
    assert loss(same, same, epoch=0).item() == pytest.approx(loss.teacher_entropy.item(), rel=1e-12)
    wide = make_loss(out_dim=1000, center_momentum=1.0)
    teacher = torch.full((4, 1000), 0.3, dtype=torch.float64, requires_grad=True)  # detached all the same
    wide(torch.randn(8, 1000, dtype=torch.float64), teacher, epoch=5)
    assert wide.teacher_entropy.item() == pytest.approx(math.log(1000), rel=1e-12)
    assert not wide.teacher_entropy.requires_grad


def test_only_pairs_of_different_views_count():
    """Student crop 0 equal to teacher crop 0 contributes nothing different from any other value:
    changing the student's crop 0 only changes the (teacher 1, student 0) term."""
    torch.manual_seed(1)
    loss = make_loss(n_crops=2, center_momentum=1.0)  # centre kept at 0
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    full = loss(s, t, 5)
    q1 = F.softmax(t[2:] / 0.07, -1)
    term = (-(q1 * F.log_softmax(s[:2] / 0.1, -1)).sum(-1)).mean()
    q0 = F.softmax(t[:2] / 0.07, -1)
    other = (-(q0 * F.log_softmax(s[2:] / 0.1, -1)).sum(-1)).mean()
    assert full.item() == pytest.approx(((term + other) / 2).item(), rel=1e-12)


def test_teacher_temperature_schedule():
    loss = make_loss(warmup_teacher_temp_epochs=3)
    temps = [loss.teacher_temperature(e) for e in range(6)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])  # np.linspace(0.04, 0.07, 3), then 0.07
    assert make_loss(warmup_teacher_temp_epochs=0).teacher_temperature(0) == 0.07
    # A warm-up longer than a run of 4 epochs: still the official linspace over 30 epochs (0.07 never reached).
    assert make_loss(warmup_teacher_temp_epochs=30).teacher_temperature(3) == pytest.approx(
        0.04 + 0.03 * 3 / 29)


def test_center_update_after_the_loss():
    torch.manual_seed(2)
    loss = make_loss(center_momentum=0.9)
    teacher = torch.randn(6, 6, dtype=torch.float64)
    student = torch.randn(12, 6, dtype=torch.float64)
    first = loss(student, teacher, 0)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    # The loss of this step used the old centre (zero); the next one uses the new one.
    assert first.item() == pytest.approx(naive_dino_loss(student, teacher, torch.zeros(6), 4, 0.04), rel=1e-10)
    old = loss.center.clone()
    teacher2 = torch.randn(6, 6, dtype=torch.float64)
    loss(student, teacher2, 0)
    assert torch.allclose(loss.center, 0.9 * old + 0.1 * teacher2.mean(0, keepdim=True))


def test_gradient_flows_to_the_student_only():
    loss = make_loss()
    s = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    loss(s, t, 0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_head_normalises_prototypes_and_norm_last_layer_fixes_g():
    torch.manual_seed(3)
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_g.requires_grad and torch.equal(head.last_g, torch.ones(5, 1))
    x = torch.randn(3, 8)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    w = head.last_v / head.last_v.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), bottleneck @ w.T, atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6  # cosine similarities to unit-norm prototypes
    head.last_v.data.mul_(7.0)
    assert torch.allclose(head(x), bottleneck @ w.T, atol=1e-6)  # invariant to the scale of v
    free = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_g.requires_grad


def test_free_prototype_norms_are_weight_normed_and_decayed_as_in_the_official_code():
    """--no-norm-last-layer: the last layer is torch's weight_norm (g of shape (out_dim, 1)), and g
    gets weight decay, as main_dino.py's get_params_groups exempts only biases and 1-D tensors."""
    import dino
    torch.manual_seed(4)
    free = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    free.last_g.data.uniform_(0.5, 2.0)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 5, bias=False))
    ref.parametrizations.weight.original0.data.copy_(free.last_g)  # g: same shape, or copy_ would fail
    ref.parametrizations.weight.original1.data.copy_(free.last_v)  # v
    x = torch.randn(3, 8)
    assert torch.allclose(free(x), ref(F.normalize(free.mlp(x), dim=-1)), atol=1e-6)
    for optimizer in ("lars", "sgd", "adamw"):
        args = argparse.Namespace(optimizer=optimizer, weight_decay=0.04, lars_eta=0.001, lars_clip=False)
        decayed, exempt = dino.make_optimizer(free.parameters(), args).param_groups
        assert any(p is free.last_g for p in decayed["params"]) and decayed["weight_decay"] == 0.04
        assert not any(p is free.last_g for p in exempt["params"]) and exempt["weight_decay"] == 0.0


def tiny_args(**kw):
    args = dict(arch="vit_tiny", patch_size=4, drop_path=0.1, grad_checkpointing=False, out_dim=32,
                head_hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    args.update(kw)
    return argparse.Namespace(**args)


def test_multicrop_net_batches_same_sized_crops_and_keeps_the_order():
    torch.manual_seed(4)
    net = MultiCropNet(tiny_args(drop_path=0.0), 16, 0.0).eval()
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    together = net(crops)
    one_by_one = torch.cat([net([c]) for c in crops])
    assert together.shape == (8, 32) and torch.allclose(together, one_by_one, atol=1e-5)


def test_teacher_starts_as_the_student_without_drop_path_and_follows_its_ema():
    torch.manual_seed(5)
    model = DINO(tiny_args(), 16)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert {b.drop_path for b in model.teacher.backbone.blocks} == {0.0}
    assert max(b.drop_path for b in model.student.backbone.blocks) == pytest.approx(0.1)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(0.9)
    for s, t, b in zip(model.student.parameters(), model.teacher.parameters(), before):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    crops = [torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 3
    student_out, teacher_out = model(crops)
    assert student_out.shape == (10, 32) and teacher_out.shape == (4, 32) and not teacher_out.requires_grad


def test_teacher_momentum_schedule():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    k = 30
    assert teacher_momentum(k, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 100) + 1) / 2)


def test_clip_gradients_clips_each_parameter_on_its_own():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    clip_gradients(torch.nn.ParameterList([a, b]), 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]).new_tensor([0.6, 0.8, 0.0]), atol=1e-6)
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4]))  # under the limit: untouched


def test_multicrop_augmentations_sizes_and_order():
    import numpy as np
    from PIL import Image

    import common
    views = common.dino_augmentations(32, (0.5,) * 3, (0.25,) * 3, local_crops=3, local_size=16,
                                      global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = common.Views(*views)(img)
    assert [tuple(x.shape) for x in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    crops = [t.transforms[0] for t in views]
    assert [c.scale for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 3
    solarize = [t.transforms[-3].p for t in views]
    assert solarize == [0.0, 0.2, 0.0, 0.0, 0.0]  # solarisation on the second global crop only
    big = common.dino_augmentations(224, (0.5,) * 3, (0.25,) * 3, 2, 96, (0.4, 1.0), (0.05, 0.4))
    blur_p = [t.transforms[4].p for t in big]
    assert blur_p == [1.0, 0.1, 0.5, 0.5]  # DINO's blur probabilities (appendix D)
    # Kernels that do not cut off sigma 2 (PIL's blur in the official code): 10% of 224 px, 13 taps at 96 px
    assert [t.transforms[4].transforms[0].kernel_size for t in big] == [(23, 23)] * 2 + [(13, 13)] * 2
    batched = [common.BatchedView.from_transform(t) for t in big]
    assert [v.blur_kernel for v in batched] == [23, 23, 13, 13]


def test_student_temperature_and_centre_momentum_are_the_flags(tmp_path):
    """--student-temp and --center-momentum reach the loss the run optimises, not only args.json:
    with --center-momentum 1 the centre never moves from 0, and with a huge student temperature the
    student's distribution is uniform (its outputs are cosines, |s| <= 1), so the first step's loss,
    -sum_k P_t[k] log P_s[k], is log(out_dim) whatever the teacher says."""
    run_script("dino.py", *TINY, *METHODS["dino.py"], "--epochs", "1", "--max-steps", "1", "--knn-every", "0",
               "--log-every", "1", "--student-temp", "10000", "--center-momentum", "1.0", "--output-dir", tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["kind"] == "step"]
    assert abs(float(rows[0]["loss"]) - math.log(256)) < 1e-3  # METHODS: --out-dim 256
    center = load(tmp_path / "last.pt")["dino_loss"]["center"]
    assert torch.equal(center, torch.zeros_like(center))
