"""Feature moments: everything the ICD losses need from one feature tensor, and the small
math that turns them into the losses.

One read of f (B, C, H, W) gives, per sample,
- per channel, over the P = H*W pixels: the sum and the sum of squares of (f - k_c), and the max;
- per pixel, over the C channels: the sum and the sum of squares of (f - k_p),
where the shifts k_c = f[b, c, 0, 0] and k_p = f[b, 0, h, w] are values of the tensor itself.
Shifting keeps the variance E[(x-k)^2] - E[x-k]^2 accurate in float32 when the mean is large
against the spread (the textbook E[x^2] - E[x]^2 cancels catastrophically there). Every
statistic of ICD_METHOD.md (mean, std, max, spatial mean and std) and the energy map
(mean over C of f^2 = spatial variance + spatial mean^2) are small functions of these.

The shifts are constants for autograd: the variance does not depend on them, and the mean is
k + sum(f - k) / n, whose gradient is 1/n through the sum alone. So the gradient of the losses
with respect to f is, elementwise,
    g_csum[c] + 2 (f - k_c) g_csq[c] + g_psum[p] + 2 (f - k_p) g_psq[p]
    + [f = max_c] g_cmax[c] / n_c
(n_c = how many elements of channel c equal its max, shared evenly as torch.amax does): one more
read of f and one write. That is what the fused backward kernels compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from icd_dist.losses.icd import MSCA, NORM_EPS, STD_EPS, relation_kl, standardise_energy
from icd_dist.losses.precision import upcast


class Moments(NamedTuple):
    """Shifted moments of one feature tensor (B, C, H, W), in the accumulation dtype.
    Channel fields are (B, C), pixel fields (B, H*W); `height`/`width` give the map size."""

    channel_shift: torch.Tensor
    channel_sum: torch.Tensor
    channel_sumsq: torch.Tensor
    channel_max: torch.Tensor
    pixel_shift: torch.Tensor
    pixel_sum: torch.Tensor
    pixel_sumsq: torch.Tensor
    height: int
    width: int


def moments_torch(f: torch.Tensor) -> Moments:
    """Moments of f with plain torch ops (differentiable through autograd). This is the CPU
    path; under torch.compile its reductions and its backward fuse into a few loops."""
    x = upcast(f)
    b, c, h, w = x.shape
    k_c = x[:, :, :1, :1].detach()
    k_p = x[:, :1].detach()
    d_c = x - k_c
    d_p = x - k_p
    return Moments(
        channel_shift=k_c.reshape(b, c),
        channel_sum=d_c.sum(dim=(2, 3)),
        channel_sumsq=(d_c * d_c).sum(dim=(2, 3)),
        channel_max=x.amax(dim=(2, 3)),
        pixel_shift=k_p.reshape(b, h * w),
        pixel_sum=d_p.sum(dim=1).reshape(b, h * w),
        pixel_sumsq=(d_p * d_p).sum(dim=1).reshape(b, h * w),
        height=h,
        width=w,
    )


def _mean_var(shift: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
    centred = total / n
    var = (total_sq / n - centred * centred).clamp_min(0.0)
    return shift + centred, var


def statistic_from_moments(m: Moments, stat: str) -> torch.Tensor:
    """The statistic `stat` of ICD_METHOD.md, flattened per sample, from the moments:
    the same values as icd.feature_statistic on the tensor itself."""
    num_pixels = m.height * m.width
    num_channels = m.channel_sum.shape[1]
    if stat in ("mean", "std"):
        mean, var = _mean_var(m.channel_shift, m.channel_sum, m.channel_sumsq, num_pixels)
        return mean if stat == "mean" else torch.sqrt(var + STD_EPS)
    if stat == "max":
        return m.channel_max
    if stat in ("spatial_mean", "spatial_std"):
        mean, var = _mean_var(m.pixel_shift, m.pixel_sum, m.pixel_sumsq, num_channels)
        return mean if stat == "spatial_mean" else torch.sqrt(var + STD_EPS)
    raise ValueError(f"unknown statistic {stat!r}")


def energy_from_moments(m: Moments) -> torch.Tensor:
    """Energy map mean over C of f^2, (B, 1, H, W): spatial variance + spatial mean^2."""
    mean, var = _mean_var(m.pixel_shift, m.pixel_sum, m.pixel_sumsq, m.channel_sum.shape[1])
    return (var + mean * mean).reshape(-1, 1, m.height, m.width)


def _log_relation(fine: Moments, coarse: Moments, msca: MSCA, tau: float) -> torch.Tensor:
    size = (coarse.height, coarse.width)
    e_fine = standardise_energy(energy_from_moments(fine), size)
    e_coarse = standardise_energy(energy_from_moments(coarse), size)
    return F.log_softmax((msca(e_fine) * msca(e_coarse)).flatten(1) / tau, dim=1)


def internal_from_moments(student: Sequence[Moments], teacher: Sequence[Moments],
                          stats: Sequence[str]) -> torch.Tensor:
    """L_int of ICD_METHOD.md from the per-level moments of the student and the teacher."""
    terms = []
    for ms, mt in zip(student, teacher, strict=True):
        for stat in stats:
            s = F.normalize(statistic_from_moments(ms, stat), dim=1, eps=NORM_EPS)
            t = F.normalize(statistic_from_moments(mt, stat), dim=1, eps=NORM_EPS)
            terms.append((s - t).norm(dim=1).mean())
    return torch.stack(terms).mean()


def external_from_moments(student: Sequence[Moments], teacher: Sequence[Moments],
                          msca: MSCA, tau: float) -> torch.Tensor:
    """L_ext of ICD_METHOD.md from the per-level moments of the student and the teacher."""
    terms = []
    for l in range(len(student) - 1):  # noqa: E741 - l is the paper's level index
        log_r_s = _log_relation(student[l], student[l + 1], msca, tau)
        with torch.no_grad():
            log_r_t = _log_relation(teacher[l], teacher[l + 1], msca, tau)
        terms.append(relation_kl(log_r_t, log_r_s, tau))
    return torch.stack(terms).mean()
