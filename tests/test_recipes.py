"""The recipes: the defaults the README's table quotes, the learning rate scaled by batch / 256 and
warmed up over whole epochs (DINO's optimisation recipes, filled in by backbone, are in test_vit.py)."""
import csv
import math

import pytest

import barlow
import byol
import dino
import linear_eval
import simclr
from conftest import METHODS, TINY, run_script


@pytest.mark.parametrize("module,expected", [
    (simclr, dict(temperature=0.2, lr=0.4, weight_decay=1e-4, proj_hidden_dim=2048, proj_dim=256, optimizer="lars",
                  color_strength=0.5, blur_prob=None)),
    (byol, dict(base_tau=0.99, lr=1.0, weight_decay=1e-5, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096,
                optimizer="lars")),
    (barlow, dict(lambd=0.0051, scale_loss=0.1, lr=0.3, weight_decay=1e-4, proj_hidden_dim=2048, proj_dim=2048,
                  optimizer="lars")),
    # DINO: the paper's teacher (momentum 0.996, temperature 0.04 -> 0.07 over 30 epochs), student
    # temperature, centre momentum, head (2048 -> 256 -> 4096 prototypes) and last layer frozen 1 epoch.
    (dino, dict(momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                student_temp=0.1, center_momentum=0.9, out_dim=4096, head_hidden_dim=2048, bottleneck_dim=256,
                norm_last_layer=True, freeze_last_layer=1, drop_path=None, local_crops=0)),  # 0.1: ViTs
])
def test_defaults_are_the_readme_recipes(module, expected):
    """The defaults are the recipes the README's table quotes: a changed default would silently train
    another method. Two are not the runs behind the table's reference accuracies, as the README says:
    SimCLR's views are the paper's (solo-learn's 90.7% used --color-strength 1.0 --blur-prob 0.5), and
    DINO's teacher is the paper's (solo-learn's 89.5%: momentum 0.9995, no or a 50-epoch warm-up)."""
    args = vars(module.get_args_parser().parse_args([]))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("module", [simclr, byol, barlow, dino])
def test_every_method_shares_solo_learns_schedule_and_lars(module):
    """solo-learn's CIFAR recipe for all four: ResNet-18, batch 256, 1000 epochs, 10 warm-up epochs,
    LARS eta 0.02 with the clipped rate (DINO's ResNet recipe picks LARS: test_vit.py)."""
    args = vars(module.get_args_parser().parse_args([]))
    expected = dict(arch="resnet18", batch_size=256, epochs=1000, warmup_epochs=10, lars_eta=0.02, lars_clip=True,
                    dataset="cifar10", precision="auto")
    assert {k: args[k] for k in expected} == expected


def test_linear_eval_defaults_are_the_usual_protocol():
    """The offline linear evaluation as commonly run on CIFAR (solo-learn's linear evaluation): SGD,
    lr 0.1 for a batch of 256, no weight decay, no warm-up, 100 epochs, the frozen backbone in the
    loop (--mode linear: random crop and flip of every image)."""
    args = vars(linear_eval.get_args_parser().parse_args(["--ckpt", "random"]))
    expected = dict(optimizer="sgd", lr=0.1, weight_decay=0.0, warmup_epochs=0, epochs=100, batch_size=256,
                    mode="linear")
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("script", ["simclr.py", "byol.py", "barlow.py"])
def test_lr_is_scaled_by_batch_and_warmed_up_over_whole_epochs(tmp_path, script):
    """The logged learning rate of the first steps: --lr is for a batch of 256 (scaled by
    batch / 256), the warm-up lasts --warmup-epochs epochs of steps (linear from base / warmup_steps),
    then the cosine starts at the base rate."""
    # TINY: 128 images, batch 32: 4 steps per epoch; 3 epochs: 12 steps, 4 of warm-up.
    run_script(script, *TINY, *METHODS[script], "--epochs", "3", "--warmup-epochs", "1", "--max-steps", "6",
               "--lr", "0.8", "--knn-every", "0", "--log-every", "1", "--output-dir", tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["kind"] == "step"]
    base = 0.8 * 32 / 256
    expected = [base * (s + 1) / 4 for s in range(4)] + [base * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in (0, 1)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
