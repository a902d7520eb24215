"""ICD reference losses against an independent float64 numpy implementation, hand cases,
gradcheck and the properties the method needs."""

import math

import numpy as np
import pytest
import torch

from icd_dist.losses.icd import MSCA, STATS, energy_map, external_loss, internal_loss

# ---------------------------------------------------------------- numpy reference ----------


def np_stat(f, stat):
    b = f.shape[0]
    if stat == "mean":
        return f.mean(axis=(2, 3))
    if stat == "std":
        return np.sqrt(f.var(axis=(2, 3)) + 1e-5)
    if stat == "max":
        return f.max(axis=(2, 3))
    if stat == "spatial_mean":
        return f.mean(axis=1).reshape(b, -1)
    return np.sqrt(f.var(axis=1) + 1e-5).reshape(b, -1)


def np_normalize(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)


def np_internal(fs_list, ft_list, stats):
    terms = []
    for fs, ft in zip(fs_list, ft_list, strict=True):
        for k in stats:
            d = np_normalize(np_stat(fs, k)) - np_normalize(np_stat(ft, k))
            terms.append(np.linalg.norm(d, axis=1).mean())
    return float(np.mean(terms))


def np_adaptive_pool(e, size):
    b, h, w = e.shape
    oh, ow = size
    out = np.zeros((b, oh, ow))
    for i in range(oh):
        r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, i, j] = e[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def np_conv_same(x, kh, kw):
    """Zero-padded 'same' convolution of (B, H, W) maps with a kh x kw averaging kernel."""
    b, h, w = x.shape
    xp = np.zeros((b, h + kh - 1, w + kw - 1))
    xp[:, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w] = x
    out = np.zeros_like(x)
    for a in range(kh):
        for c in range(kw):
            out += xp[:, a:a + h, c:c + w]
    return out / (kh * kw)


def np_msca(x, kernels=(7, 11, 21)):
    a = np_conv_same(x, 5, 5)
    return a + sum(np_conv_same(np_conv_same(a, 1, k), k, 1) for k in kernels)


def np_energy(f, size=None):
    e = (f ** 2).mean(axis=1)
    if size is not None and e.shape[1:] != tuple(size):
        e = np_adaptive_pool(e, size)
    m = e.mean(axis=(1, 2), keepdims=True)
    v = e.var(axis=(1, 2), keepdims=True)
    return (e - m) / np.sqrt(v + 1e-5)


def np_log_relation(f1, f2, tau):
    z = (np_msca(np_energy(f1, f2.shape[2:])) * np_msca(np_energy(f2))).reshape(f1.shape[0], -1)
    z = z / tau
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_external(fs_list, ft_list, tau):
    terms = []
    for l in range(len(fs_list) - 1):  # noqa: E741
        ls = np_log_relation(fs_list[l], fs_list[l + 1], tau)
        lt = np_log_relation(ft_list[l], ft_list[l + 1], tau)
        terms.append(tau ** 2 * (np.exp(lt) * (lt - ls)).sum(axis=1).mean())
    return float(np.mean(terms))


# ---------------------------------------------------------------- fixtures ------------------

SHAPES = [(2, 3, 9, 7), (2, 4, 5, 4), (2, 5, 5, 4)]  # odd sizes, non-divisible pooling


def make_feats(seed, shapes=SHAPES, dtype=torch.float64, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.relu(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    student = [t + noise * torch.randn(t.shape, generator=g, dtype=torch.float64)
               for t in teacher]
    return [s.to(dtype) for s in student], [t.to(dtype) for t in teacher]


def as_np(feats):
    return [f.double().numpy() for f in feats]


# ---------------------------------------------------------------- tests ---------------------


@pytest.mark.parametrize("stats", [STATS, ("mean",), ("max", "spatial_std")])
def test_internal_matches_numpy_reference(stats):
    s, t = make_feats(0)
    ours = internal_loss(s, t, stats).item()
    assert ours == pytest.approx(np_internal(as_np(s), as_np(t), stats), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.1, 3.0])
def test_external_matches_numpy_reference(tau):
    s, t = make_feats(1)
    ours = external_loss(s, t, tau=tau).item()
    assert ours == pytest.approx(np_external(as_np(s), as_np(t), tau), rel=1e-9)


def test_external_other_kernels_match_reference():
    s, t = make_feats(2)
    ours = external_loss(s, t, tau=0.5, kernels=(3, 5)).item()
    ref_msca = np_msca
    try:
        globals()["np_msca"] = lambda x, kernels=(3, 5): ref_msca(x, kernels)
        ref = np_external(as_np(s), as_np(t), 0.5)
    finally:
        globals()["np_msca"] = ref_msca
    assert ours == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    s, t = make_feats(3, dtype=dtype, noise=1.0)
    # the reference sees the same (rounded) values in float64: only float32 accumulation
    # error remains, whatever the input dtype
    assert internal_loss(s, t).dtype == torch.float32
    assert internal_loss(s, t).item() == pytest.approx(
        np_internal(as_np(s), as_np(t), STATS), rel=1e-5)
    # KL of two close distributions cancels: float32 keeps ~1e-3 of it here
    assert external_loss(s, t).item() == pytest.approx(
        np_external(as_np(s), as_np(t), 1.0), rel=2e-3, abs=1e-7)


def test_internal_hand_case():
    fs = [torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)]
    ft = [torch.tensor([4.0, 3.0]).view(1, 2, 1, 1)]
    # normalised means (0.6, 0.8) and (0.8, 0.6): distance sqrt(0.08)
    assert internal_loss(fs, ft, ("mean",)).item() == pytest.approx(math.sqrt(0.08))


def test_msca_fixed_on_constant_map_and_has_no_parameters():
    msca = MSCA()
    assert list(msca.parameters()) == []
    x = torch.full((1, 1, 61, 61), 2.0)
    out = msca(x)
    # interior: every averaging kernel keeps a constant: A = 2, plus three branches of 2
    assert out[0, 0, 30, 30].item() == pytest.approx(8.0)
    assert out[0, 0, 0, 0].item() < 8.0  # zero padding at the border


def test_learned_msca_starts_equal_to_fixed_and_gets_gradients():
    s, t = make_feats(4, dtype=torch.float32)
    learned = MSCA(learned=True)
    assert len(list(learned.parameters())) == 7
    fixed_loss = external_loss(s, t)
    learned_loss = external_loss(s, t, msca=learned)
    assert learned_loss.item() == pytest.approx(fixed_loss.item(), rel=1e-6)
    learned_loss.backward()
    assert learned.w5.grad is not None and learned.w5.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="MSCA module"):
        external_loss(s, t, msca="learned")


def test_gradcheck_float64():
    s, t = make_feats(5, shapes=[(2, 3, 5, 4), (2, 2, 3, 2), (2, 3, 3, 2)])
    s = [x.requires_grad_(True) for x in s]
    assert torch.autograd.gradcheck(lambda *xs: internal_loss(list(xs), t), tuple(s))
    assert torch.autograd.gradcheck(lambda *xs: external_loss(list(xs), t, tau=0.7), tuple(s))


def test_zero_when_equal_positive_otherwise():
    s, t = make_feats(6)
    assert internal_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)
    assert external_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)
    assert internal_loss(s, t).item() > 1e-3
    assert external_loss(s, t).item() > 1e-6


def test_internal_invariant_to_a_common_positive_scale():
    s, t = make_feats(7, shapes=[(2, 16, 9, 7), (2, 16, 5, 4)])
    exact = ("mean", "max", "spatial_mean")
    for k in (0.5, 3.0, 40.0):
        ks, kt = [k * x for x in s], [k * x for x in t]
        assert internal_loss(ks, kt, exact).item() == pytest.approx(
            internal_loss(s, t, exact).item(), rel=1e-12)
        # the std statistics hold 1e-5 inside the square root: invariant to ~1e-5 / variance
        assert internal_loss(ks, kt).item() == pytest.approx(internal_loss(s, t).item(),
                                                             rel=1e-4)


def test_teacher_gets_no_gradient_and_student_does():
    s, t = make_feats(8, dtype=torch.float32)
    s = [x.requires_grad_(True) for x in s]
    t = [x.requires_grad_(True) for x in t]
    (internal_loss(s, t) + external_loss(s, t)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_energy_map_is_standardised():
    f = torch.relu(torch.randn(3, 6, 8, 10, dtype=torch.float64))
    e = energy_map(f, (4, 5))
    assert e.shape == (3, 1, 4, 5)
    assert torch.allclose(e.mean(dim=(2, 3)), torch.zeros(3, 1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(e.var(dim=(2, 3), unbiased=False),
                          torch.ones(3, 1, dtype=torch.float64), atol=1e-3)


def test_shape_and_argument_errors():
    s, t = make_feats(9)
    with pytest.raises(ValueError, match="same number"):
        internal_loss(s, t[:2])
    with pytest.raises(ValueError, match="level 1"):
        internal_loss(s, [t[0], t[2], t[2]])
    with pytest.raises(ValueError, match=">= 2"):
        external_loss(s[:1], t[:1])
    with pytest.raises(ValueError, match="unknown statistic"):
        internal_loss(s, t, ("median",))
    with pytest.raises(ValueError, match="tau"):
        external_loss(s, t, tau=0)
