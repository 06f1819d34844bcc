"""One step of each script's train_one_epoch, in process, against the method written out by hand:
the loss the loop optimises and logs pairs the right views, with the right temperature, scale and
symmetrisation, and the target (teacher) moves by its EMA after the optimizer step. The loss
functions themselves are tested in the test_loss files; this checks how the loop calls them."""
import argparse
import copy
import math

import pytest
import torch

import barlow
import byol
import dino
import simclr
from test_loss import naive_nt_xent
from test_loss_byol_barlow import naive_barlow
from test_loss_dino import naive_dino_loss

STEP, TOTAL = 7, 20  # a step in the middle of the schedules


class NoSignal:
    def requested(self):
        return False


def one_step(module, model, views, args, *extra, epoch=0, amp_dtype=None):
    """Run train_one_epoch on a one-batch loader from step STEP with plain SGD; return the loss it
    recorded. The arguments before the loader are the script's own (raw_model, criterion)."""
    args.optimizer, args.log_every = "sgd", 1000
    run = argparse.Namespace(step=STEP, epoch=epoch, total_steps=TOTAL, warmup_steps=0, base_lr=0.5, lr=0.0,
                             device=torch.device("cpu"), memory_format=torch.contiguous_format, amp_dtype=amp_dtype,
                             losses=torch.zeros(2, 2 if module is dino else 1), n_row=0, n_epoch=0,
                             preemption=NoSignal(), end_step=STEP + 1)
    optimizer = module.make_optimizer(model.parameters(), args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    module.train_one_epoch(model, *extra, [(views, None)], optimizer, scaler, run, args)
    assert run.step == STEP + 1 and run.n_epoch == 1
    return run.losses[0, 0].item()


def views(n=2, size=8, batch=6):
    torch.manual_seed(1)
    return [torch.randn(batch, 3, size, size) for _ in range(n)]


def assert_ema(followers, leaders, before, m):
    """followers == m * before + (1 - m) * leaders, with the leaders' values after the step."""
    followers, leaders = list(followers), list(leaders)
    assert len(followers) == len(leaders) == len(before)
    for f, b, lead in zip(followers, before, leaders):
        torch.testing.assert_close(f, m * b + (1 - m) * lead, rtol=1e-5, atol=1e-6)


def test_simclr_step_is_nt_xent_of_the_two_views():
    args = simclr.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--proj-dim", "16", "--temperature", "0.3"])
    torch.manual_seed(0)
    model = simclr.SimCLR(args, 8)
    x1, x2 = views()
    z1, z2 = copy.deepcopy(model)(torch.cat([x1, x2])).chunk(2)  # train mode: batch statistics of all 2N views
    expected = naive_nt_xent(z1.double(), z2.double(), 0.3).item()
    assert one_step(simclr, model, (x1, x2), args) == pytest.approx(expected, rel=1e-5)


def test_byol_step_is_symmetrised_across_views_and_the_target_follows_after_it():
    args = byol.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--pred-hidden-dim", "32", "--proj-dim", "16",
                                              "--base-tau", "0.5"])  # a large EMA step: the test can see it
    torch.manual_seed(0)
    model = byol.BYOL(args, 8)
    x1, x2 = views()
    for p in model.target.parameters():  # not the online network's copy any more, as after some steps
        p.add_(torch.randn_like(p) * 0.1)
    p1, p2, z1, z2 = copy.deepcopy(model)(x1, x2)
    expected = (byol.byol_loss(p1, z2) + byol.byol_loss(p2, z1)).item()  # each view predicts the other's target
    assert expected != pytest.approx((byol.byol_loss(p1, z1) + byol.byol_loss(p2, z2)).item(), rel=1e-3)
    online_before = [p.clone() for p in model.online.parameters()]
    target_before = [p.clone() for p in model.target.parameters()]
    assert one_step(byol, model, (x1, x2), args, model) == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(online_before, model.online.parameters()))
    tau = 1 - (1 - 0.5) * (math.cos(math.pi * STEP / TOTAL) + 1) / 2  # section 3.3, at this step
    assert_ema(model.target.parameters(), model.online.parameters(), target_before, tau)


def test_byol_forward_is_the_online_prediction_and_the_target_projection():
    """p = predictor(online(x)) and z = target(x) for each view, with batch statistics: the step test
    builds its expected loss from the model's own forward, so a forward without the predictor (or with
    it on the target too) passed it. The predictor is BYOL's asymmetry, needed against collapse."""
    args = byol.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--pred-hidden-dim", "32", "--proj-dim", "16"])
    torch.manual_seed(0)
    model = byol.BYOL(args, 8).train()
    with torch.no_grad():
        for p in model.target.parameters():  # not the online network's copy any more, as after some steps
            p.add_(torch.randn_like(p) * 0.1)
        x1, x2 = views()
        p1, p2, z1, z2 = model(x1, x2)
        alone = copy.deepcopy(model)
        for x, p, z in ((x1, p1, z1), (x2, p2, z2)):
            torch.testing.assert_close(p, alone.predictor(alone.online(x)))
            torch.testing.assert_close(z, alone.target(x))
            assert not torch.allclose(p, alone.online(x), atol=1e-3)


def test_byol_target_keeps_the_batchnorm_statistics_of_its_own_forward_in_train_mode():
    """update_target averages the parameters only: the target's BatchNorm running statistics are
    those of its own forward passes of the two views with batch statistics (train mode), not the
    online network's copied over, nor left unchanged by an eval-mode forward."""
    args = byol.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--pred-hidden-dim", "32", "--proj-dim", "16",
                                              "--base-tau", "0.5"])
    torch.manual_seed(0)
    model = byol.BYOL(args, 8)
    x1, x2 = views()
    for p in model.target.parameters():  # not the online network's copy any more, as after some steps
        p.add_(torch.randn_like(p) * 0.1)
    alone = copy.deepcopy(model.target).train()
    with torch.no_grad():
        alone(x1), alone(x2)
    one_step(byol, model, (x1, x2), args, model)
    for (name, b), expected, online in zip(model.target.named_buffers(), alone.buffers(), model.online.buffers()):
        assert torch.equal(b, expected), name
        if b.is_floating_point():
            assert not torch.equal(b, online), name


def test_barlow_step_is_the_scaled_cross_correlation_loss():
    args = barlow.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--proj-dim", "16", "--lambd", "0.02",
                                                "--scale-loss", "0.25"])
    torch.manual_seed(0)
    model = barlow.BarlowTwins(args, 8)
    x1, x2 = views()
    z1, z2 = copy.deepcopy(model)(x1, x2)
    expected = 0.25 * naive_barlow(z1.double(), z2.double(), 0.02).item()
    assert one_step(barlow, model, (x1, x2), args) == pytest.approx(expected, rel=1e-5)


def test_barlow_loss_is_computed_in_fp32_under_bf16_autocast():
    """Under --precision bf16 the network runs in bf16, the loss of its outputs in fp32: the
    standardisation and the D x D cross-correlation lose about 1% in bf16."""
    args = barlow.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--proj-dim", "16", "--scale-loss", "1"])
    torch.manual_seed(0)
    model = barlow.BarlowTwins(args, 8)
    x1, x2 = views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = copy.deepcopy(model)(x1, x2)
    assert z1.dtype == torch.bfloat16
    expected = naive_barlow(z1.double(), z2.double(), args.lambd).item()
    assert one_step(barlow, model, (x1, x2), args, amp_dtype=torch.bfloat16) == pytest.approx(expected, rel=1e-4)


def test_barlow_views_go_through_the_network_one_by_one():
    """Each view is its own batch (BatchNorm statistics per view, as the official code), and z2 is
    the second view's embedding."""
    args = barlow.get_args_parser().parse_args(["--proj-hidden-dim", "32", "--proj-dim", "16"])
    torch.manual_seed(0)
    model = barlow.BarlowTwins(args, 8).train()
    x1, x2 = views()
    with torch.no_grad():
        z1, z2 = model(x1, x2)
        alone = copy.deepcopy(model)
        expected = [alone.projector(alone.backbone(x)) for x in (x1, x2)]
        joint = alone.projector(alone.backbone(torch.cat([x1, x2]))).chunk(2)
    torch.testing.assert_close(z1, expected[0])
    torch.testing.assert_close(z2, expected[1])
    assert not torch.allclose(z1, joint[0], atol=1e-3)


@pytest.mark.parametrize("epoch,frozen", [(3, True), (4, False)])
def test_dino_step_uses_the_epochs_teacher_temperature_and_the_teacher_follows_after_it(epoch, frozen):
    args = dino.get_args_parser().parse_args([
        "--out-dim", "16", "--head-hidden-dim", "32", "--bottleneck-dim", "8", "--local-crops", "2",
        "--local-crop-size", "4", "--warmup-teacher-temp-epochs", "10", "--freeze-last-layer", "4",
        "--momentum-teacher", "0.5", "--epochs", "20"])
    args.image_size = 8
    dino.fill_recipe(args)
    torch.manual_seed(0)
    model = dino.DINO(args, 8)
    criterion = dino.DINOLoss(args.out_dim, 4, args.warmup_teacher_temp, args.teacher_temp,
                              args.warmup_teacher_temp_epochs, args.student_temp, args.center_momentum)
    criterion.center.copy_(torch.randn(1, args.out_dim) * 0.1)
    center = criterion.center.clone()
    crops = views(2, 8) + views(2, 4)
    for p in model.teacher.parameters():  # not the student's copy any more, as after some steps
        p.add_(torch.randn_like(p) * 0.1)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    student_out, teacher_out = copy.deepcopy(model)(crops)
    t_temp = 0.04 + (0.07 - 0.04) * epoch / 9  # np.linspace(0.04, 0.07, 10)[epoch]: main_dino.py's, per epoch
    expected = naive_dino_loss(student_out.double(), teacher_out.double(), center[0].double(), 4, t_temp)
    last_v = model.student.head.last_v.clone()
    assert one_step(dino, model, crops, args, model, criterion, epoch=epoch) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(model.student.head.last_v, last_v) == frozen  # prototypes fixed for --freeze-last-layer epochs
    m = 1 - (1 - 0.5) * (math.cos(math.pi * STEP / TOTAL) + 1) / 2
    assert_ema(model.teacher.parameters(), model.student.parameters(), teacher_before, m)
    torch.testing.assert_close(criterion.center, 0.9 * center + 0.1 * teacher_out.mean(0, keepdim=True))


def test_dino_teacher_sees_the_global_crops_in_train_mode():
    """The teacher's outputs are its own forward of the two global crops, with batch statistics (a
    ResNet teacher in eval mode would normalise with running statistics it never trained): the local
    crops here have the global crops' size, so the forward cannot tell them apart by shape."""
    args = dino.get_args_parser().parse_args(["--out-dim", "16", "--head-hidden-dim", "32", "--bottleneck-dim", "8"])
    args.image_size = 8
    dino.fill_recipe(args)
    torch.manual_seed(0)
    model = dino.DINO(args, 8).train()
    with torch.no_grad():  # not the student's copy any more, as after some steps
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    crops = views(4, 8)
    _, teacher_out = model(crops)
    assert model.teacher.training and teacher_out.shape == (2 * 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher_out, model.teacher(crops[:2]))
        assert not torch.allclose(teacher_out, model.teacher(crops[2:]))
        assert not torch.allclose(teacher_out, copy.deepcopy(model.teacher).eval()(crops[:2]))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_freezes_the_whole_last_layer_then_trains_it(norm_last_layer):
    """--freeze-last-layer holds the prototypes' directions (last_v) and, with --no-norm-last-layer,
    their norms (last_g) too, as the official code's cancel_gradients_last_layer does."""
    args = dino.get_args_parser().parse_args([
        "--out-dim", "16", "--head-hidden-dim", "32", "--bottleneck-dim", "8", "--freeze-last-layer", "4",
        "--epochs", "20", *([] if norm_last_layer else ["--no-norm-last-layer"])])
    args.image_size = 8
    dino.fill_recipe(args)
    for epoch, frozen in ((3, True), (4, False)):
        torch.manual_seed(0)
        model = dino.DINO(args, 8)
        criterion = dino.DINOLoss(args.out_dim, 2, args.warmup_teacher_temp, args.teacher_temp,
                                  args.warmup_teacher_temp_epochs)
        head = model.student.head
        v, g = head.last_v.clone(), head.last_g.clone()
        one_step(dino, model, views(2, 8), args, model, criterion, epoch=epoch)
        assert torch.equal(head.last_v, v) == frozen
        assert torch.equal(head.last_g, g) == (frozen or norm_last_layer)  # a fixed norm never trains


# DINO's loop: the weight-decay schedule on the weights' group only, and --clip-grad.
def dino_step_once(flags, seed=0, scaler=None):
    args = dino.get_args_parser().parse_args([
        "--out-dim", "16", "--head-hidden-dim", "32", "--bottleneck-dim", "8", "--local-crops", "2",
        "--local-crop-size", "4", "--freeze-last-layer", "0", "--epochs", "20", "--optimizer", "sgd", *flags])
    args.image_size, args.log_every = 8, 1000
    dino.fill_recipe(args)
    torch.manual_seed(seed)
    model = dino.DINO(args, 8)
    criterion = dino.DINOLoss(args.out_dim, 4, args.warmup_teacher_temp, args.teacher_temp,
                              args.warmup_teacher_temp_epochs, args.student_temp, args.center_momentum)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(6, 3, 4, 4, generator=g)
                                                                        for _ in range(2)]
    run = argparse.Namespace(step=STEP, epoch=0, total_steps=TOTAL, warmup_steps=0, base_lr=0.5, lr=0.0,
                             device=torch.device("cpu"), memory_format=torch.contiguous_format, amp_dtype=None,
                             losses=torch.zeros(2, 2), n_row=0, n_epoch=0, preemption=NoSignal(), end_step=STEP + 1)
    optimizer = dino.make_optimizer(model.student.parameters(), args)
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    dino.train_one_epoch(model, model, criterion, [(crops, None)], optimizer, scaler, run, args)
    return model, optimizer, before, run


def test_weight_decay_follows_its_cosine_schedule_on_the_weights_only():
    _, optimizer, _, _ = dino_step_once(["--weight-decay", "0.04", "--weight-decay-end", "0.4", "--clip-grad", "0"])
    expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * STEP / TOTAL))  # main_dino.py's wd_schedule
    weights, biases = optimizer.param_groups
    assert weights["weight_decay"] == expected
    assert biases["weight_decay"] == 0.0  # biases and norms (1-D) never; the ViT's cls_token and
    # pos_embed (3-D) are decayed, as main_dino.py's get_params_groups does


def test_clip_grad_clips_each_parameter_before_the_step():
    """SGD's first step moves each parameter by lr x (clipped gradient), weight decay 0: no
    parameter moves by more than lr x clip, and without the clip some would (by far)."""
    clip = 1e-3
    model, optimizer, before, run = dino_step_once(["--weight-decay", "0", "--clip-grad", str(clip)])
    moves = [(p.detach() - before[n]).norm().item() / run.lr for n, p in model.student.named_parameters()]
    assert max(moves) <= clip * (1 + 1e-3)  # float32 rounding of the small moves
    model, optimizer, before, run = dino_step_once(["--weight-decay", "0", "--clip-grad", "0"])
    moves = [(p.detach() - before[n]).norm().item() / run.lr for n, p in model.student.named_parameters()]
    assert max(moves) > 10 * clip  # the unclipped step: the clip above did something


def test_clip_grad_clips_the_unscaled_gradients_under_fp16_loss_scaling():
    """--precision fp16 (V100, T4) scales the loss by 2^16: the clip applies to the true gradients
    (unscaled first), so the step moves by up to lr x clip, not 2^16 times less."""
    clip = 1e-3
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    model, _, before, run = dino_step_once(["--weight-decay", "0", "--clip-grad", str(clip)], scaler=scaler)
    moves = [(p.detach() - before[n]).norm().item() / run.lr for n, p in model.student.named_parameters()]
    assert 0.5 * clip < max(moves) <= clip * (1 + 1e-3)
