"""The training crop is MiB/PLOP's RandomResizedCrop (their dataset/transform.py): up to 10
draws of a box that must fit in the image, then their central fallback; the box always lies in
the image and nothing is padded. Checked against hand computations, the probability the rule
implies, and an independent numpy float64 version of the rule."""

import math
import random

import numpy as np
import pytest
import torch

import icd_dist.data.transforms as T

SHAPES = [(512, 512), (37, 300), (300, 37), (1, 1), (375, 500), (500, 375), (7, 13), (1, 2),
          (2, 1), (101, 120), (10, 1000)]


def draws(height, width, n, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return [T.sample_crop_params(height, width, g, **kw) for _ in range(n)]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_box_lies_inside_the_image(shape):
    H, W = shape
    params = draws(H, W, 5000, seed=H * 1000 + W)
    for p in params:
        assert p.height >= 1 and p.width >= 1, p
        assert p.top >= 0 and p.top + p.height <= H, p
        assert p.left >= 0 and p.left + p.width <= W, p
        assert p.height * p.width <= H * W, p
    flips = sum(p.flip for p in params) / len(params)
    assert 0.45 < flips < 0.55
    assert not any(p.flip for p in draws(H, W, 50, seed=1, hflip=False))


@pytest.mark.parametrize("shape, expected", [
    # W=300, H=37: a draw has h >= sqrt(0.5 * 11100 / (4/3)) = 64.5 > 37: never fits.
    # in_ratio = 300/37 > 4/3 -> h = 37, w = round(37 * 4/3 = 49.33) = 49,
    # top = (37 - 37) // 2 = 0, left = (300 - 49) // 2 = 251 // 2 = 125
    ((37, 300), (0, 125, 37, 49)),
    # W=37, H=300: a draw has w >= sqrt(5550 * 3/4) = 64.5 > 37: never fits.
    # in_ratio = 37/300 < 3/4 -> w = 37, h = round(37 / 0.75 = 49.33) = 49,
    # top = (300 - 49) // 2 = 125, left = 0
    ((300, 37), (125, 0, 49, 37)),
    # W=20, H=100: w >= sqrt(1000 * 3/4) = 27.4 > 20: never fits.
    # in_ratio = 0.2 < 3/4 -> w = 20, h = round(26.67) = 27, top = 73 // 2 = 36, left = 0
    ((100, 20), (36, 0, 27, 20)),
    # W=1000, H=10: h >= sqrt(5000 / (4/3)) = 61.2 > 10: never fits.
    # in_ratio = 100 > 4/3 -> h = 10, w = round(13.33) = 13, top = 0, left = 987 // 2 = 493
    ((10, 1000), (0, 493, 10, 13)),
    # 1x1: whatever is drawn, the only box inside is the pixel itself
    ((1, 1), (0, 0, 1, 1)),
])
def test_fallback_is_the_central_crop(shape, expected):
    for p in draws(*shape, 200, seed=7):
        assert (p.top, p.left, p.height, p.width) == expected


def test_fallback_after_ten_failed_draws_by_hand():
    never = [0.99] * 10  # s = 0.5 + 1.5 * 0.99 = 1.985: about twice the image's area
    mid = [0.5] * 10  # aspect exp(~0) = 1
    # H=100, W=100: each draw w = h = round(sqrt(19850)) = round(140.9) = 141 > 100.
    # in_ratio = 1 (within [3/4, 4/3]) -> the whole image
    assert T.crop_box_from_uniforms(100, 100, never, mid, 0.3, 0.6) == (0, 0, 100, 100)
    # H=101, W=120 (in_ratio 1.19 within) -> the whole image
    assert T.crop_box_from_uniforms(101, 120, never, mid, 0.3, 0.6) == (0, 0, 101, 120)
    # H=100, W=200: w = h = round(sqrt(1.985 * 20000) = 199.2) = 199 > 100: fails.
    # in_ratio = 2 > 4/3 -> h = 100, w = round(133.33) = 133, top 0, left = 67 // 2 = 33
    assert T.crop_box_from_uniforms(100, 200, never, mid, 0.3, 0.6) == (0, 33, 100, 133)
    # one more draw that fits would have been taken: the 10th (s = 0.5 + 1.5 * 0.0 = 0.5,
    # w = h = round(sqrt(10000) = 100) = 100 <= 100, top = floor(0.3 * 1) = 0, left
    # = floor(0.6 * 101) = 60)
    assert T.crop_box_from_uniforms(100, 200, never[:9] + [0.0], mid, 0.3, 0.6) == (0, 60, 100,
                                                                                    100)


def test_a_draw_that_fits_by_hand(monkeypatch):
    """H=400, W=600 (area 240000), scale (0.5, 2), ratio (3/4, 4/3), L = log(4/3):
    draw 0: u_s 0.9 -> s = 1.85, target 444000; u_r 0.5 -> log aspect = -L + 2L * 0.5 = 0:
            w = h = round(666.33) = 666 > 600: fails;
    draw 1: u_s 0.2 -> s = 0.8, target 192000; u_r 0.75 -> aspect = exp(L/2) = 1.1547:
            w = round(sqrt(221702.5) = 470.85) = 471 <= 600 but h = round(407.77) = 408 > 400:
            fails (both sides must fit);
    draw 2: u_s 0.1 -> s = 0.65, target 156000; u_r 0.75: w = round(424.42) = 424,
            h = round(367.56) = 368: fits. top = floor(0.5 * (400 - 368 + 1)) = floor(16.5)
            = 16, left = floor(0.3 * (600 - 424 + 1)) = floor(53.1) = 53.
    The flip uniform 0.3 < 0.5: flipped."""
    u_scale = [0.9, 0.2, 0.1] + [0.0] * 7
    u_ratio = [0.5, 0.75, 0.75] + [0.0] * 7
    stream = u_scale + u_ratio + [0.5, 0.3] + [0.3]
    real_rand = torch.rand

    def fake_rand(n, generator=None, dtype=torch.float32):
        assert isinstance(generator, torch.Generator)  # the randomness is the generator's
        out = torch.tensor(stream[:n], dtype=dtype)
        del stream[:n]
        return out

    monkeypatch.setattr(torch, "rand", fake_rand)
    p = T.sample_crop_params(400, 600, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "rand", real_rand)
    assert p == T.CropParams(top=16, left=53, height=368, width=424, flip=True)
    assert not stream  # 10 + 10 + 2 uniforms for the box, 1 for the flip
    assert T.crop_box_from_uniforms(400, 600, u_scale, u_ratio, 0.5, 0.3) == (16, 53, 368, 424)


def test_rounding_is_pythons_and_placement_covers_both_ends():
    # scale (0.25, 0.25), ratio (1, 1): target = area / 4, aspect exactly 1.
    # 5x5: sqrt(6.25) = 2.5 -> round half to even = 2 (floor(x + 0.5) would give 3);
    # 7x7: sqrt(12.25) = 3.5 -> 4. top/left = floor(u * (H - h + 1)): 0 at u = 0, H - h at u -> 1
    one = dict(scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert T.crop_box_from_uniforms(5, 5, [0.0] * 10, [0.0] * 10, 0.5, 0.0, **one) == (2, 0, 2, 2)
    assert T.crop_box_from_uniforms(7, 7, [0.0] * 10, [0.0] * 10, 0.0, 0.9999, **one) == (0, 3,
                                                                                      4, 4)
    # over many draws every top in 0..H-h occurs (randint with both ends included)
    ps = draws(20, 20, 3000, seed=3, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert {(p.height, p.width) for p in ps} == {(10, 10)}
    assert {p.top for p in ps} == set(range(11)) and {p.left for p in ps} == set(range(11))


def test_randomness_comes_from_the_generator_only():
    random.seed(1)
    a = draws(333, 444, 50, seed=11)
    random.seed(2)
    np.random.seed(2)
    b = draws(333, 444, 50, seed=11)
    assert a == b
    assert a != draws(333, 444, 50, seed=12)


def numpy_rule(height, width, n, rng, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3)):
    """The rule, vectorised in float64 numpy (np.rint rounds half to even as Python's round):
    returns (fallback flags, box areas / image area) of n crops."""
    area = height * width
    s = scale[0] + (scale[1] - scale[0]) * rng.random((n, 10))
    aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * rng.random((n, 10)))
    w = np.rint(np.sqrt(s * area * aspect))
    h = np.rint(np.sqrt(s * area / aspect))
    fits = (w <= width) & (h <= height)
    fallback = ~fits.any(1)
    first = fits.argmax(1)
    rows = np.arange(n)
    frac = np.where(fallback, 1.0, w[rows, first] * h[rows, first] / area)  # square: whole image
    return fallback, frac


def test_fallback_rate_and_areas_on_a_square_image():
    """512x512: a draw fits iff sqrt(A s a) < 512.5 and sqrt(A s / a) < 512.5, i.e.
    s < c exp(-|t|) with c = (512.5 / 512)^2, s ~ U(0.5, 2), t = log a ~ U(-L, L), L = log(4/3).
    P(fit) = E[(c exp(-|t|) - 0.5) / 1.5] = (c (1 - 3/4) / L - 0.5) / 1.5 = 0.2471,
    P(fallback) = (1 - P(fit))^10 = 0.0585: the whole image (a drawn 512x512 box has
    probability ~1e-5 per draw, below the tolerance)."""
    H = W = 512
    L = math.log(4 / 3)
    c = (512.5 / 512) ** 2
    p_fit = (c * 0.25 / L - 0.5) / 1.5
    p_fallback = (1 - p_fit) ** 10
    n = 20000
    ps = draws(H, W, n, seed=0)
    whole = np.array([(p.top, p.left, p.height, p.width) == (0, 0, H, W) for p in ps])
    frac = np.array([p.height * p.width / (H * W) for p in ps])
    assert frac.max() <= 1.0  # never larger than the image
    sigma = math.sqrt(p_fallback * (1 - p_fallback) / n)
    assert abs(whole.mean() - p_fallback) < 4.5 * sigma, (whole.mean(), p_fallback)
    # the same rule in numpy (independent draws): same fallback rate, same area distribution
    fb_np, frac_np = numpy_rule(H, W, 200000, np.random.default_rng(0))
    assert abs(fb_np.mean() - p_fallback) < 0.002
    drawn, drawn_np = frac[~whole], frac_np[~fb_np]
    # s >= 0.5; each side rounded by at most 1/2 pixel: (sqrt(t a) - 1/2)(sqrt(t / a) - 1/2)
    # >= t - (418 + 314) / 2 for t = 131072, a in [3/4, 4/3]: fraction >= 0.4986
    assert drawn.min() >= 0.498 and drawn.max() <= 1.0
    assert abs(drawn.mean() - drawn_np.mean()) < 0.006, (drawn.mean(), drawn_np.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(drawn, q) - np.quantile(drawn_np, q)) < 0.015


def test_train_transform_never_pads_inside_and_pads_when_asked():
    g = torch.Generator().manual_seed(0)
    H, W = 48, 64
    image = torch.full((3, H, W), 200, dtype=torch.uint8)
    mask = (torch.arange(H * W) % 5).view(H, W).to(torch.uint8)  # ids 0..4, no 255
    for _ in range(300):
        img, msk = T.train_transform(image, mask, 32, g)
        assert img.shape == (3, 32, 32) and msk.shape == (32, 32)
        assert msk.max().item() < 5  # no 255: nothing was padded
        assert img.min().item() == 200  # no black padding in the image
    padded = [T.train_transform(image, mask, 32, g, mode="padded") for _ in range(50)]
    assert any((m == T.IGNORE_INDEX).any() for _, m in padded)
    assert any((i == 0).any() for i, _ in padded)
    with pytest.raises(ValueError, match="crop mode"):
        T.sample_crop_params(H, W, g, mode="reflect")


def test_train_transform_crops_the_sampled_box():
    """The output is the sampled box (a slice of the image) resized, then flipped."""
    H, W = 40, 50
    image = torch.arange(3 * H * W).view(3, H, W).remainder(251).to(torch.uint8)
    mask = torch.arange(H * W).view(H, W).remainder(200).to(torch.uint8)
    for seed in range(100):
        p = T.sample_crop_params(H, W, torch.Generator().manual_seed(seed))
        img, msk = T.train_transform(image, mask, 24, torch.Generator().manual_seed(seed))
        box = (slice(p.top, p.top + p.height), slice(p.left, p.left + p.width))
        ref_img = T.resize_image(image[(..., *box)], (24, 24))
        ref_msk = T.resize_mask(mask[box], (24, 24))
        if p.flip:
            ref_img, ref_msk = ref_img.flip(-1), ref_msk.flip(-1)
        assert torch.equal(msk, ref_msk)
        assert torch.equal(img, ref_img)
