"""Batched augmentation (common.BatchedView, common.DeviceLoader) against torchvision: the same
parameter distributions as the PIL pipeline it is built from, the same output as torchvision's
functional ops for fixed parameters, and views that do not depend on the number of processes."""
import types

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import common

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images(n=8, h=32, w=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def test_from_transform_reads_every_recipe():
    simclr = common.BatchedView.from_transform(common.simclr_augmentation(32, MEAN, STD))
    assert (simclr.size, simclr.scale, simclr.flip_p, simclr.jitter_p, simclr.gray_p) == (32, (0.08, 1), 0.5, 0.8, 0.2)
    assert [x for r in simclr.jitter for x in r] == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.6, 1.4, -0.1, 0.1])
    assert simclr.blur_p == 0.0
    solo = common.BatchedView.from_transform(common.simclr_augmentation(32, MEAN, STD, strength=1.0, blur_p=0.5))
    assert [x for r in solo.jitter for x in r] == pytest.approx([0.2, 1.8, 0.2, 1.8, 0.2, 1.8, -0.2, 0.2])
    assert (solo.blur_p, solo.blur_kernel, solo.blur_sigma) == (0.5, 13, (0.1, 2.0))
    v1, v2 = (common.BatchedView.from_transform(t) for t in common.byol_augmentations(224, MEAN, STD))
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.blur_kernel == 23 and v1.blur_sigma == (0.1, 2.0) and v1.mean == MEAN
    crops = common.dino_augmentations(32, MEAN, STD, 2, 16, (0.4, 1.0), (0.05, 0.4))
    local = common.BatchedView.from_transform(crops[2])
    assert (local.size, local.scale) == (16, (0.05, 0.4))
    with pytest.raises(ValueError, match="no batched version"):
        common.BatchedView.from_transform(T.Compose([T.RandomRotation(10)]))


@pytest.mark.parametrize("height,width,scale,ratio", [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                      (40, 96, (0.5, 1.0), (3 / 4, 4 / 3)),
                                                      (96, 40, (0.5, 1.0), (3 / 4, 4 / 3)),
                                                      (32, 32, (0.05, 0.4), (3 / 4, 4 / 3))])
def test_crop_boxes_follow_torchvision_distribution(height, width, scale, ratio):
    """Area fraction, aspect ratio, position and fallback rate of 20,000 boxes against as many from
    RandomResizedCrop.get_params (a wide 40x96 or tall 96x40 image, height x width, with scale >= 0.5
    often needs the fallback: its fixed, centred box is part of each distribution)."""
    n = 20000
    view = common.BatchedView(32, scale, ratio, MEAN, STD)
    i, j, h, w = torch.from_numpy(view.sample(n, height, width, np.random.default_rng(0))["box"]).double().unbind(1)
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
                        for _ in range(n)], dtype=torch.float64)
    ri, rj, rh, rw = ref.unbind(1)
    for ours, theirs, step in [(h * w / (height * width), rh * rw / (height * width), 0.0),
                               (torch.log(w / h), torch.log(rw / rh), 0.0), (i / height, ri / height, 1 / height),
                               (j / width, rj / width, 1 / width)]:
        assert abs(ours.mean() - theirs.mean()) < 0.01
        for q in (0.1, 0.5, 0.9):  # positions are whole pixels: their quantiles move by 1 px steps
            assert abs(ours.quantile(q) - theirs.quantile(q)) < 0.02 + step
    assert ((h + i) <= height).all() and ((w + j) <= width).all() and (h >= 1).all() and (w >= 1).all()


@pytest.mark.parametrize("height,width,box", [(96, 40, (21, 0, 53, 40)), (40, 96, (0, 21, 40, 53)),
                                              (50, 60, (0, 0, 50, 60))])
def test_crop_box_fallback_equals_torchvision(height, width, box):
    """With scale (1, 1) no try fits an image outside the ratio range (its area needs a side longer
    than the image), so every box is RandomResizedCrop.get_params's fallback: for a tall image
    (96x40, width / height < 3/4) the full width and height round(width / (3/4)), centred
    vertically; for a wide one the full height, width round(height * 4/3), centred horizontally; an
    image inside the range is taken whole. Both give the same boxes, not just the same law (except
    that for an image inside the range, 4% of torchvision's draws are a try whose rounding makes a
    box one pixel narrower: its seed is fixed, as its result otherwise depends on the tests before)."""
    view = common.BatchedView(32, (1.0, 1.0), (3 / 4, 4 / 3), MEAN, STD)
    ours = view.sample(50, height, width, np.random.default_rng(0))["box"]
    torch.manual_seed(0)
    ref = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [1.0, 1.0], [3 / 4, 4 / 3])
    assert tuple(ref) == box
    assert (ours == np.array(box, dtype=ours.dtype)).all(), ours[:3]


def test_jitter_flip_gray_blur_solarize_probabilities():
    view = common.BatchedView.from_transform(common.byol_augmentations(224, MEAN, STD)[1])
    p = {k: torch.from_numpy(v) for k, v in view.sample(40000, 64, 64, np.random.default_rng(1)).items()}
    applied = p["jitter"][:, 0] != 1.0
    assert abs(applied.double().mean() - 0.8) < 0.01
    b, c, s, h = p["jitter"][applied].double().unbind(1)
    ref = [T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1])[1:] for _ in range(5000)]
    ref = torch.tensor(ref, dtype=torch.float64)
    for ours, theirs, lo, hi in [(b, ref[:, 0], 0.6, 1.4), (c, ref[:, 1], 0.6, 1.4), (s, ref[:, 2], 0.8, 1.2),
                                 (h, ref[:, 3], -0.1, 0.1)]:
        assert lo <= ours.min() and ours.max() <= hi
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
    order = p["order"]
    assert (order.sort(1).values == torch.arange(4)).all()  # permutations
    assert abs((order[:, 0] == 3).double().mean() - 0.25) < 0.01  # each op first a quarter of the time
    for key, prob in (("flip", 0.5), ("gray", 0.2), ("solarize", 0.2)):
        assert abs(p[key].double().mean() - prob) < 0.01, key
    blurred = p["sigma"] > 0
    assert abs(blurred.double().mean() - 0.1) < 0.01
    assert 0.1 <= p["sigma"][blurred].min() and p["sigma"][blurred].max() <= 2.0


def test_crop_and_flip_equal_torchvision_resized_crop():
    x = images(4, 40, 56).permute(0, 3, 1, 2).float() / 255
    view = common.BatchedView(24, (0.08, 1), (3 / 4, 4 / 3), MEAN, STD)
    boxes = torch.tensor([[0, 0, 40, 56], [5, 7, 10, 13], [30, 40, 9, 16], [2, 3, 37, 30]], dtype=torch.float32)
    flip = torch.tensor([False, True, False, True])
    out = view.crop(x, boxes, flip)
    for k, (i, j, h, w) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(x[k], i, j, h, w, [24, 24], antialias=False)
        ref = TF.hflip(ref) if flip[k] else ref
        assert torch.allclose(out[k], ref, atol=2e-6), k


def test_color_ops_equal_torchvision_functional():
    x = images(4, 16, 16, seed=2).permute(0, 3, 1, 2).float() / 255
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.08], [0.6, 1.4, 0.8, -0.1], [1.0, 1.0, 1.0, 0.0], [0.9, 1.1, 0.9, 0.05]])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    out = common.BatchedView.color_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(4):
        ref = x[k]
        for op in order[k].tolist():
            ref = ops[op](ref, factors[k, op].item())
        assert torch.allclose(out[k], ref, atol=1e-5), (k, (out[k] - ref).abs().max())
    assert torch.allclose(common._gray(x).expand_as(x), TF.rgb_to_grayscale(x, 3), atol=1e-6)


def test_color_jitter_of_a_large_batch_equals_torchvision():
    """64 images with random factors and orders: the rows are sorted into groups by the position of
    their hue and processed in 6 blend slots around one hue rotation; each row must still get its
    4 ops in its own order, as torchvision's functional ops do one image at a time."""
    x = images(64, 12, 12, seed=7).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(7)
    factors = torch.cat([0.4 + 1.2 * torch.rand(64, 3, generator=g), torch.rand(64, 1, generator=g) - 0.5], 1)
    factors[::5] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # not jittered: unchanged, bit for bit
    order = torch.rand(64, 4, generator=g).argsort(1)
    out = common.BatchedView.color_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(64):
        ref = x[k]
        for op in order[k].tolist():
            ref = ops[op](ref, factors[k, op].item()) if k % 5 else ref
        assert torch.allclose(out[k], ref, atol=1e-5), (k, (out[k] - ref).abs().max())
    assert torch.equal(out[::5], x[::5])


def test_hue_rotation_on_ties_grey_and_extremes():
    """Pixels where two channels tie for the maximum, grey, black and white pixels, and shifts of
    0, +-0.5 turns: the branch-free hue rotation against torchvision's adjust_hue."""
    pixels = [[1.0, 1.0, 0.2], [0.3, 0.8, 0.8], [0.6, 0.1, 0.6], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0],
              [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.9, 0.4], [0.25, 0.5, 1.0]]
    x = torch.tensor(pixels).t().reshape(1, 3, 3, 3)
    for shift in (0.0, 0.5, -0.5, 0.1, -0.37):
        ours = common._shift_hue(x, torch.tensor([shift]))
        assert torch.allclose(ours[0], TF.adjust_hue(x[0], shift), atol=1e-6), shift
    inplace = x.clone()
    common._shift_hue(inplace, torch.tensor([0.3]), out=inplace)
    assert torch.equal(inplace, common._shift_hue(x, torch.tensor([0.3])))


def test_blur_and_solarize_equal_torchvision_functional():
    x = images(3, 20, 20, seed=3).permute(0, 3, 1, 2).float() / 255
    for kernel in (7, 13):  # 13: SimCLR's blur at 32 px or less (--blur-prob), wide against the image
        view = common.BatchedView(20, (0.08, 1), (3 / 4, 4 / 3), MEAN, STD, blur_p=1.0, blur_kernel=kernel)
        sigma = torch.tensor([0.1, 1.3, 0.0])
        out = view.blur(x, sigma)
        for k, s in enumerate(sigma.tolist()):
            ref = TF.gaussian_blur(x[k], [kernel, kernel], [s, s]) if s > 0 else x[k]
            assert torch.allclose(out[k], ref, atol=1e-5), (kernel, k)
    solarized = torch.where(x >= 128 / 255, 1 - x, x)
    assert torch.equal(solarized, TF.solarize(x, 128 / 255))


def test_whole_view_matches_the_pil_pipeline_statistics():
    """2,000 views of one image through the PIL pipeline and through the batched one: the same
    per-channel mean and spread of the normalised output (PIL rounds to uint8 after every op and
    antialiases; the statistics agree to a few hundredths)."""
    img = common.synthetic_images(1, 32, seed=4)[0][0]
    t = common.byol_augmentations(32, MEAN, STD)[1]
    torch.manual_seed(0)
    pil = torch.stack([t(T.functional.to_pil_image(img)) for _ in range(2000)])
    view = common.BatchedView.from_transform(t)
    batch = torch.from_numpy(np.repeat(img[None], 2000, 0))
    ours = view(batch, np.random.default_rng(0))
    assert ours.shape == pil.shape == (2000, 3, 32, 32)
    assert torch.allclose(ours.mean((0, 2, 3)), pil.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(ours.std((0, 2, 3)), pil.std((0, 2, 3)), rtol=0.05)


def test_blurring_views_equal_torchvision_functional_per_sample():
    """BYOL's two views at 96 px (blur p=1.0 / 0.1 with a 9-tap kernel, solarisation p=0 / 0.2),
    made in one pass as DeviceLoader makes them, against each sample rebuilt one by one with
    torchvision's functional ops from the parameters the batched path drew (the same draws again
    from a Generator with the same seed): crop and flip, the jitter in its sampled order, grayscale,
    blur with its own sigma, solarisation, normalisation. The blur is checked as applied inside a
    view: skipped, or given to the wrong rows, it changes the output. Pixels within 1e-4 of the
    solarisation threshold before it may fall on either side and are left out."""
    x = images(8, 120, 100, seed=9)
    views = [common.BatchedView.from_transform(t) for t in common.byol_augmentations(96, MEAN, STD)]
    assert [v.blur_kernel for v in views] == [9, 9]
    outs = common.BatchedView.many(views, x, np.random.default_rng(6))
    rng = np.random.default_rng(6)
    params = [v.sample(len(x), 120, 100, rng) for v in views]
    blurred = np.concatenate([p["sigma"] > 0 for p in params])
    assert blurred[:8].all() and 0 < blurred[8:].sum() < 8  # all of view 1, a few rows of view 2
    assert len(set(np.concatenate([p["sigma"] for p in params])[blurred].tolist())) == blurred.sum()
    for key in ("gray", "solarize", "flip"):  # each on some rows and not on others
        assert 0 < sum(p[key].sum() for p in params) < 16, key
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    src = x.permute(0, 3, 1, 2).float() / 255
    for v, (view, p, out) in enumerate(zip(views, params, outs)):
        for k in range(len(x)):
            i, j, h, w = p["box"][k].astype(int).tolist()
            ref = TF.resized_crop(src[k], i, j, h, w, [96, 96], antialias=False)
            ref = TF.hflip(ref) if p["flip"][k] else ref
            if (p["jitter"][k] != np.array([1.0, 1.0, 1.0, 0.0])).any():
                for op in p["order"][k].tolist():
                    ref = ops[op](ref, p["jitter"][k, op].item())
            ref = TF.rgb_to_grayscale(ref, 3) if p["gray"][k] else ref
            s = p["sigma"][k].item()
            ref = TF.gaussian_blur(ref, [view.blur_kernel] * 2, [s, s]) if s > 0 else ref
            keep = torch.ones_like(ref, dtype=torch.bool)
            if p["solarize"][k]:
                keep = (ref - 128 / 255).abs() > 1e-4
                ref = TF.solarize(ref, 128 / 255)
            ref = TF.normalize(ref, MEAN, STD)
            err = (out[k] - ref).abs()[keep]
            assert keep.float().mean() > 0.99 and err.max() < 2e-4, (v, k, err.max())


def test_views_do_not_depend_on_the_number_of_processes():
    data = images(16, 16, 16, seed=5).numpy()
    views = [common.BatchedView.from_transform(t) for t in common.byol_augmentations(16, MEAN, STD)]

    def first_batch(world_size, rank, epoch=0, skip=0):
        loader = common.DeviceLoader(data, None, views, 8 // world_size, world_size, rank, 0, torch.device("cpu"))
        loader.sampler.set_epoch(epoch, skip)
        return next(iter(loader))[0]

    one = first_batch(1, 0)
    two = [first_batch(2, r) for r in (0, 1)]
    for v in range(2):
        interleaved = torch.stack([two[0][v], two[1][v]], 1).flatten(0, 1)  # rank r has rows r, r+2, ...
        assert torch.equal(one[v], interleaved)
    # Resumed after one batch: the second batch, as in the uninterrupted epoch.
    loader = common.DeviceLoader(data, None, views, 8, 1, 0, 0, torch.device("cpu"))
    loader.sampler.set_epoch(0)
    second = list(loader)[1][0]
    assert all(torch.equal(a, b) for a, b in zip(second, first_batch(1, 0, skip=8)))
    assert not torch.equal(first_batch(1, 0, epoch=1)[0], one[0])


def test_views_made_in_one_pass_equal_views_made_one_by_one():
    """DeviceLoader makes the views that share a size (BYOL's two, DINO's two global and its local
    crops) in one pass over all their rows: the same tensors as one view after the other."""
    x = images(6, 32, 32, seed=8)
    byol = [common.BatchedView.from_transform(t) for t in common.byol_augmentations(32, MEAN, STD)]
    dino = [common.BatchedView.from_transform(t)
            for t in common.dino_augmentations(32, MEAN, STD, 3, 16, (0.4, 1.0), (0.05, 0.4))]
    for views in (byol, dino[:2], dino[2:]):
        assert all(views[0].same_pass(v) for v in views)
        together = common.BatchedView.many(views, x, np.random.default_rng(3), rank=1, world_size=2)
        rng = np.random.default_rng(3)
        one_by_one = [v(x, rng, rank=1, world_size=2) for v in views]
        assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))
    assert not dino[0].same_pass(dino[2])
    loader = common.DeviceLoader(x.numpy(), None, dino, 6, 1, 0, 0, torch.device("cpu"))
    assert loader.groups == [[0, 1], [2, 3, 4]]
    loader.sampler.set_epoch(0)
    assert [tuple(v.shape) for v in next(iter(loader))[0]] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3


@pytest.mark.parametrize("local", [4, 6, 7])
def test_tiny_local_crops_of_large_images_blur_within_their_size(local):
    """Above 64 px DINO's local crops blur with 13 taps at least; a crop of 6 px or less cannot be
    reflect-padded by 6 (a traceback in the first batch, PIL and batched): the kernel is capped at
    2 x size - 1 taps, and both pipelines make the view."""
    from PIL import Image
    crop = common.dino_augmentations(72, MEAN, STD, 1, local, (0.14, 1.0), (0.05, 0.14))[2]
    view = common.BatchedView.from_transform(crop)
    assert view.blur_kernel == min(13, 2 * local - 1) and view.blur_p == 0.5
    out = view(images(8, 72, 72, seed=2), np.random.default_rng(0))
    assert out.shape == (8, 3, local, local) and torch.isfinite(out).all()
    torch.manual_seed(0)
    pil = [crop(Image.fromarray(images(1, 72, 72, seed=k)[0].numpy())) for k in range(8)]
    assert all(v.shape == (3, local, local) for v in pil)


def test_aug_device_flag_errors(tmp_path):
    from conftest import TINY, run_script
    proc = run_script("simclr.py", *TINY, "--aug-device", "cuda", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "--aug-device cuda but training runs on the CPU" in proc.stderr


def test_rows_blurred_and_solarized_are_blurred_first():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    view = common.BatchedView(16, (1.0, 1.0), (3 / 4, 4 / 3), MEAN, STD, blur_p=1.0, blur_kernel=5, solarize_p=1.0)
    out = view(x, np.random.default_rng(1))
    p = view.sample(4, 16, 16, np.random.default_rng(1))
    assert (p["sigma"] > 0).all() and p["solarize"].all() and (p["box"] == [0, 0, 16, 16]).all()
    src = x.permute(0, 3, 1, 2).float() / 255
    for k in range(4):
        s = p["sigma"][k].item()
        blurred = TF.gaussian_blur(src[k], [5, 5], [s, s])
        keep = (blurred - 128 / 255).abs() > 1e-4
        ref = TF.normalize(TF.solarize(blurred, 128 / 255), MEAN, STD)
        assert keep.float().mean() > 0.99
        assert (out[k] - ref).abs()[keep].max() < 1e-4, k


def test_blur_sigma_is_uniform_between_0_1_and_2():
    view = common.BatchedView.from_transform(common.byol_augmentations(224, MEAN, STD)[0])  # blur p=1.0
    sigma = torch.from_numpy(view.sample(20000, 64, 64, np.random.default_rng(2))["sigma"]).double()
    torch.manual_seed(0)
    ref = torch.tensor([T.GaussianBlur.get_params(0.1, 2.0) for _ in range(20000)], dtype=torch.float64)
    for q in (0.1, 0.5, 0.9):
        assert abs(sigma.quantile(q) - ref.quantile(q)) < 0.03, q
    assert abs(sigma.mean() - 1.05) < 0.02


@pytest.mark.parametrize("size", [32, 96, 224])
def test_byol_views_crop_scale_ratio_and_flip(size):
    views = common.byol_augmentations(size, MEAN, STD)
    assert len(views) == 2
    for t in views:
        crop, flip = t.transforms[:2]
        assert isinstance(crop, T.RandomResizedCrop) and tuple(crop.size) == (size, size)
        assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
        assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
        v = common.BatchedView.from_transform(t)
        assert (v.size, v.scale, v.flip_p, v.jitter_p, v.gray_p) == (size, (0.08, 1.0), 0.5, 0.8, 0.2)
        assert [x for r in v.jitter for x in r] == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
    # Blur p 1.0 / 0.1 above 64 px, none at 64 px or less (solo-learn's CIFAR views); solarisation 0 / 0.2.
    blur = (1.0, 0.1) if size > 64 else (0.0, 0.0)
    v1, v2 = (common.BatchedView.from_transform(t) for t in views)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (*blur, 0.0, 0.2)
    crops = common.dino_augmentations(size, MEAN, STD, 2, size // 2, (0.14, 1.0), (0.05, 0.14))
    d = [common.BatchedView.from_transform(t) for t in crops]
    local = (0.5 if size > 64 else 0.0, 0.0)
    assert [(v.blur_p, v.solarize_p) for v in d] == [(blur[0], 0.0), (blur[1], 0.2), local, local]


def test_solarisation_inverts_the_pixels_at_the_threshold():
    """RandomSolarize(128) inverts the pixels >= 128 (PIL's and torchvision's solarize): a pixel of
    exactly 128 is inverted, 127 is not. 2x2 images kept whole at 2 px, whose bilinear resampling is
    exact, hold every value 0-255: the view equals torchvision's solarize of the uint8 images."""
    view = common.BatchedView(2, (1.0, 1.0), (3 / 4, 4 / 3), MEAN, STD, solarize_p=1.0)
    values = torch.arange(256, dtype=torch.uint8).reshape(64, 2, 2)
    x = torch.stack([values, values.flip(0), values.roll(5, 0)], -1)
    out = view(x, np.random.default_rng(0))
    ref = TF.normalize(TF.solarize(x.permute(0, 3, 1, 2), 128).float() / 255, MEAN, STD)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_from_transform_reads_each_ops_own_parameters():
    """from_transform copies every parameter of the recipe, not the values the recipes happen to
    share (crop ratio, blur sigma range), and refuses a solarisation threshold other than 128,
    which the batched path does not implement."""
    t = T.Compose([T.RandomResizedCrop(20, scale=(0.3, 0.6), ratio=(0.5, 2.0)), T.RandomHorizontalFlip(0.3),
                   T.RandomApply([T.ColorJitter(0.1, 0.2, 0.3, 0.05)], p=0.6), T.RandomGrayscale(0.15),
                   T.RandomApply([T.GaussianBlur(5, sigma=(0.5, 1.5))], p=0.45), T.RandomSolarize(128, p=0.7),
                   T.ToTensor(), T.Normalize(MEAN, STD)])
    v = common.BatchedView.from_transform(t)
    assert (v.size, v.scale, v.ratio, v.mean, v.std) == (20, (0.3, 0.6), (0.5, 2.0), MEAN, STD)
    assert (v.flip_p, v.jitter_p, v.gray_p, v.blur_p, v.solarize_p) == (0.3, 0.6, 0.15, 0.45, 0.7)
    assert [x for r in v.jitter for x in r] == pytest.approx([0.9, 1.1, 0.8, 1.2, 0.7, 1.3, -0.05, 0.05])
    assert (v.blur_kernel, v.blur_sigma) == (5, (0.5, 1.5))
    with pytest.raises(ValueError, match="no batched version"):
        common.BatchedView.from_transform(T.Compose([T.RandomSolarize(100, p=0.2)]))


def test_views_made_in_one_pass_share_size_kernel_normalisation_and_hue():
    """Views of one pass go through the ops of the first: a view that differs in output size, blur
    kernel, normalisation or whether it shifts the hue needs a pass of its own; probabilities and
    ranges are per-row parameters and may differ."""
    base = dict(size=16, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=MEAN, std=STD, jitter=(None,) * 4,
                blur_kernel=5)
    view = common.BatchedView(**base)
    assert view.same_pass(common.BatchedView(**{**base, "scale": (0.5, 1.0)}, flip_p=0.5, gray_p=0.2, blur_p=1.0,
                                             solarize_p=0.2, jitter_p=0.8, blur_sigma=(1.0, 2.0)))
    for change in ({"size": 8}, {"blur_kernel": 7}, {"mean": STD}, {"std": MEAN},
                   {"jitter": ((0.6, 1.4), None, None, (-0.1, 0.1))}):
        assert not view.same_pass(common.BatchedView(**{**base, **change})), change


def test_aug_device_picks_the_batched_or_the_pil_pipeline(tmp_path):
    """--aug-device auto: images held in memory are augmented batched (DeviceLoader), image files by
    the PIL transforms in a DataLoader; cpu: the PIL pipeline even for images in memory; cuda on
    image files: one line naming the fix (checked with a CUDA device object: nothing runs on it)."""
    images, labels = common.synthetic_images(16, size=8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    files = common.ImageSet(files=sorted(tmp_path.glob("*.png")), labels=labels)
    in_memory = common.ImageSet(images=images, labels=labels)
    views = [common.simclr_augmentation(8, MEAN, STD)] * 2
    cpu = torch.device("cpu")

    def loader(aug_device, dataset, device=cpu):
        args = types.SimpleNamespace(aug_device=aug_device, dataset="imagefolder", seed=0, workers=0)
        return common.pretrain_loader(dataset, views, 8, 1, 0, args, device)

    assert isinstance(loader("auto", in_memory), common.DeviceLoader)
    for aug_device, dataset in (("auto", files), ("cpu", in_memory), ("cpu", files)):
        pil = loader(aug_device, dataset)
        assert isinstance(pil, torch.utils.data.DataLoader), aug_device
        assert isinstance(pil.dataset.transform, common.Views)
    with pytest.raises(SystemExit, match="--aug-device cuda needs images held in memory"):
        loader("cuda", files, torch.device("cuda"))
