"""info_nce_loss against a naive implementation, hand-computed values and its invariances."""
import math

import torch
import torch.nn.functional as F

from simclr import info_nce_loss


def naive_nt_xent(z1, z2, t):
    """Equation 1 of the SimCLR paper, written as a loop over the 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = torch.exp(z[i] @ z[pos] / t)
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total = total - torch.log(num / den)
    return total / (2 * n)


def test_matches_naive_loop():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for t in (0.1, 0.5, 1.0):
        assert torch.allclose(info_nce_loss(z1, z2, t), naive_nt_xent(z1, z2, t), atol=1e-10)


def test_hand_computed_two_images():
    # Two images, unit vectors: views of image 0 at angle 0 and 90 degrees, of image 1 at 180 and 270.
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    # Every anchor: its positive is at 90 degrees (cos 0), its negatives at 180 (cos -1) and 90 (cos 0).
    # l = -log(e^0 / (e^0 + e^(-1/t) + e^0)) for all four anchors.
    t = 0.5
    expected = -math.log(1 / (2 + math.exp(-1 / t)))
    assert abs(info_nce_loss(z1, z2, t).item() - expected) < 1e-12


def test_invariances():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    loss = info_nce_loss(z1, z2, 0.2)
    # Scale of each embedding does not matter (cosine similarity).
    scales = torch.rand(8, 1, dtype=torch.float64) * 10 + 0.1
    assert torch.allclose(info_nce_loss(z1 * scales, z2 * 3.0, 0.2), loss)
    # Order of the images in the batch does not matter, nor which view is called first.
    perm = torch.randperm(8)
    assert torch.allclose(info_nce_loss(z1[perm], z2[perm], 0.2), loss)
    assert torch.allclose(info_nce_loss(z2, z1, 0.2), loss)
    # Pairing matters: shuffling only the second view changes the loss.
    assert not torch.allclose(info_nce_loss(z1, z2[perm], 0.2), loss)


def test_aligned_pairs_give_lower_loss_and_gradients_flow():
    torch.manual_seed(2)
    z1 = torch.randn(16, 8, requires_grad=True)
    aligned = info_nce_loss(z1, z1.detach() + 0.01 * torch.randn(16, 8), 0.1)
    random = info_nce_loss(z1, torch.randn(16, 8), 0.1)
    assert aligned < random
    # The minimum of -log(1/(1 + sum of 2N-2 negatives)) is bounded below by 0 and reached only
    # with well separated negatives: the loss is positive.
    assert aligned > 0
    random.backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
