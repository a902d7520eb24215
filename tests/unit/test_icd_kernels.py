"""The fused ICD implementations (Triton kernels, compiled torch path) against the float64
reference, in the style of Liger-Kernel's tests: forward and gradient, every dtype with its
tolerance, odd shapes, both memory formats, non-contiguous inputs, grad_output != 1.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py); the same
tests run on CUDA where it exists (marked `cuda`)."""

from __future__ import annotations

import pytest
import torch

from icd_dist.losses import icd
from icd_dist.losses.kernels import moments as fused
from icd_dist.losses.kernels.dispatch import icd_terms, resolve_impl, triton_available

# Odd sizes everywhere: 13x11 pools to 7x6 with uneven windows; 17 and 9 channels are not
# multiples of any block.
LEVELS = ((3, 17, 13, 11), (3, 9, 7, 6), (3, 20, 7, 6))
# (relative tolerance on the losses, relative tolerance on the gradient's max error)
TOLERANCES = {torch.float32: (2e-3, 2e-4), torch.bfloat16: (3e-2, 2e-2),
              torch.float16: (5e-3, 2e-3)}

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


def make_features(seed: int, dtype: torch.dtype, device: str, layout: str = "nchw",
                  levels=LEVELS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-ReLU-like student and teacher taps (teacher = student + noise) in `layout`:
    nchw, channels_last, or noncontiguous (every other column of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for shape in levels:
        base = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64) + 0.3)
        noisy = torch.relu(base + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64))
        pair = []
        for f in (base, noisy):
            f = f.to(dtype)
            if layout == "channels_last":
                f = f.to(memory_format=torch.channels_last)
            elif layout == "noncontiguous":
                wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)
                wide[..., ::2] = f
                f = wide[..., ::2]
                assert not f.is_contiguous()
            pair.append(f.to(device))
        student.append(pair[0].requires_grad_())
        teacher.append(pair[1])
    return student, teacher


def reference64(student, teacher, stats, tau, msca):
    """Float64 reference losses and their gradients on the same (upcast) values."""
    s64 = [f.detach().double().requires_grad_() for f in student]
    t64 = [f.double() for f in teacher]
    l_int = icd.internal_loss(s64, t64, stats)
    l_ext = icd.external_loss(s64, t64, tau, msca)
    return l_int, l_ext, s64


def check_against_reference(impl, dtype, device, layout, stats=icd.STATS, tau=0.7,
                            w_int=1.7, w_ext=-35.0, seed=0):
    student, teacher = make_features(seed, dtype, device, layout)
    msca = icd.MSCA()
    l_int, l_ext = icd_terms(student, teacher, stats=stats, tau=tau, msca=msca, impl=impl)
    r_int, r_ext, s64 = reference64(student, teacher, stats, tau, msca)
    rtol, gtol = TOLERANCES[dtype]
    assert l_int.dtype == torch.float32 and l_ext.dtype == torch.float32
    assert l_int.item() == pytest.approx(r_int.item(), rel=rtol)
    # L_ext is a KL between near-equal distributions: its error is relative to the log-probs,
    # so it gets an absolute floor as well.
    assert l_ext.item() == pytest.approx(r_ext.item(), rel=rtol, abs=1e-6)
    # grad_output != 1 and different for the two terms.
    (w_int * l_int + w_ext * l_ext).backward()
    (w_int * r_int + w_ext * r_ext).backward()
    for f, ref in zip(student, s64, strict=True):
        assert f.grad is not None and f.grad.dtype == dtype and f.grad.shape == f.shape
        scale = ref.grad.abs().max().item()
        err = (f.grad.double().cpu() - ref.grad.cpu()).abs().max().item()
        assert err <= gtol * scale, f"max grad error {err:.3g} vs scale {scale:.3g}"


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_triton_matches_float64_reference(dtype, layout, device):
    check_against_reference("triton", dtype, device, layout)


# Every compiled variant is a recompile (about 30 s here), so the CPU matrix is every dtype in
# NCHW plus both other layouts in float32.
COMPILED_CASES = [(torch.float32, "nchw"), (torch.bfloat16, "nchw"), (torch.float16, "nchw"),
                  (torch.float32, "channels_last"), (torch.float32, "noncontiguous")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "layout"), COMPILED_CASES, ids=lambda v: str(v))
def test_compiled_matches_float64_reference(dtype, layout, device):
    check_against_reference("compiled", dtype, device, layout)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_statistic_subsets_and_tau(device):
    for stats, tau in ((("std",), 0.1), (("max", "spatial_mean"), 1.0)):
        check_against_reference("triton", torch.float32, device, "nchw", stats=stats, tau=tau)


def test_float64_moments_path_equals_reference_exactly():
    """The moments formulation is the same function as the reference: in float64 the two
    agree to rounding, loss and gradient."""
    student, teacher = make_features(3, torch.float64, "cpu")
    msca = icd.MSCA()
    ms = [fused.moments_torch(f) for f in student]
    mt = [fused.moments_torch(f) for f in teacher]
    got = fused.internal_from_moments(ms, mt, icd.STATS) \
        + 50 * fused.external_from_moments(ms, mt, msca, 0.5)
    r_int, r_ext, s64 = reference64(student, teacher, icd.STATS, 0.5, msca)
    want = r_int + 50 * r_ext
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    grads = torch.autograd.grad(got, student)
    want_grads = torch.autograd.grad(want, s64)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_moments_values_and_tied_max_gradient(device):
    """Each moment against its direct float64 definition; the max's gradient is shared by
    tied elements as torch.amax shares it (post-ReLU channels are often all zero)."""
    from icd_dist.losses.kernels.triton_moments import moments_triton

    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 33, 5, 7, generator=g) + 4.0
    f[0, 3] = 0.0                      # an all-zero channel: 35 tied maxima
    f[1, 4, 1, :3] = f[1, 4].max() + 1  # three tied maxima
    f = f.to(device).requires_grad_()
    m = moments_triton(f)
    x = f.detach().double().cpu()
    kc, kp = x[:, :, :1, :1], x[:, :1]
    want = {
        "channel_sum": (x - kc).sum(dim=(2, 3)), "channel_sumsq": ((x - kc) ** 2).sum(dim=(2, 3)),
        "channel_max": x.amax(dim=(2, 3)), "pixel_sum": (x - kp).sum(dim=1).flatten(1),
        "pixel_sumsq": ((x - kp) ** 2).sum(dim=1).flatten(1),
    }
    for name, value in want.items():
        torch.testing.assert_close(getattr(m, name).double().cpu(), value, rtol=1e-5, atol=1e-4)
    weight = torch.randn(2, 33, generator=g).to(device)
    (m.channel_max * weight).sum().backward()
    x64 = x.clone().requires_grad_()
    (x64.amax(dim=(2, 3)) * weight.double().cpu()).sum().backward()
    torch.testing.assert_close(f.grad.double().cpu(), x64.grad, rtol=1e-6, atol=1e-7)
    assert x64.grad[0, 3].abs().sum() > 0  # the tie case really splits the gradient


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "compiled"])
def test_large_mean_small_spread_keeps_std_accurate(impl):
    """Features far from zero (mean 1000, spread 0.01): E[x^2] - E[x]^2 in float32 would lose
    the variance entirely; the shifted moments keep it."""
    g = torch.Generator().manual_seed(7)
    f = 1000 + 0.01 * torch.randn(2, 8, 9, 10, generator=g, dtype=torch.float64)
    moments = fused.moments_torch if impl == "compiled" else \
        __import__("icd_dist.losses.kernels.triton_moments", fromlist=["x"]).moments_triton
    f32 = f.float()
    m = moments(f32)
    for stat in ("std", "spatial_std"):
        got = fused.statistic_from_moments(m, stat).double()
        want = icd.feature_statistic(f32.double(), stat)  # the same float32 values, exactly
        torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    # The unshifted formula on the same values is far off (even NaN): the check above can fail.
    dims = (2, 3)
    naive = torch.sqrt((f32 * f32).mean(dim=dims) - f32.mean(dim=dims) ** 2 + icd.STD_EPS)
    assert not torch.allclose(naive.double(), icd.feature_statistic(f32.double(), "std"),
                              rtol=0.1)


def test_resolve_impl():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("auto", cpu) == "compiled"
    assert resolve_impl("eager", cuda) == "eager"
    if triton_available():
        assert resolve_impl("auto", cuda) == "triton"
    with pytest.raises(ValueError, match="allowed: auto, triton, compiled, eager"):
        resolve_impl("fast", cpu)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA features"):
        resolve_impl("triton", torch.device("cpu"))


def test_icd_terms_checks_its_arguments():
    student, teacher = make_features(0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown statistic 'median'"):
        icd_terms(student, teacher, stats=("median",), impl="eager")
    with pytest.raises(ValueError, match="tau must be positive"):
        icd_terms(student, teacher, tau=0.0, impl="eager")
    with pytest.raises(ValueError, match="levels"):
        icd_terms(student[:2], teacher, impl="eager")
    only_ext = icd_terms(student, teacher, want_internal=False, impl="eager")
    assert only_ext[0] is None and only_ext[1] is not None
