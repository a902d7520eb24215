"""ICD distillation, the readable eager reference (ICD_METHOD.md is the specification).

- internal_loss: per level, statistics of the features (per-channel mean, std, max; per-pixel
  mean and std over channels), each L2-normalised per sample; the L2 distance between the
  student's and the teacher's, averaged over samples, statistics and levels.
- external_loss: per adjacent pair of levels, energy maps (mean of squares over channels),
  pooled to the coarser size and standardised, passed through MSCA; the softmax over pixels
  of their product (/ tau) is the cross-scale relation; KL(teacher || student) * tau^2,
  averaged over samples and pairs.

All statistics are computed in float32 whatever the feature dtype. Every fused kernel is
tested against these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.losses.precision import upcast

STATS = ("mean", "std", "max", "spatial_mean", "spatial_std")
STD_EPS = 1e-5
NORM_EPS = 1e-8
MSCA_KERNELS = (7, 11, 21)


def feature_statistic(f: torch.Tensor, stat: str) -> torch.Tensor:
    """One statistic of features f (B, C, H, W), flattened per sample, in float32:
    mean/std/max over (H, W) -> (B, C); spatial_mean/spatial_std over C -> (B, H*W).
    std is the population std with STD_EPS inside the square root."""
    f = upcast(f)
    if stat == "mean":
        return f.mean(dim=(2, 3))
    if stat == "std":
        return torch.sqrt(f.var(dim=(2, 3), unbiased=False) + STD_EPS)
    if stat == "max":
        return f.amax(dim=(2, 3))
    if stat == "spatial_mean":
        return f.mean(dim=1).flatten(1)
    if stat == "spatial_std":
        return torch.sqrt(f.var(dim=1, unbiased=False) + STD_EPS).flatten(1)
    raise ValueError(f"unknown statistic {stat!r}; allowed: {', '.join(STATS)}")


def check_levels(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor],
                 minimum: int) -> None:
    """Raise ValueError unless student and teacher give the same number (>= minimum) of
    levels with equal shapes level by level."""
    if len(feats_s) != len(feats_t) or len(feats_s) < minimum:
        raise ValueError(f"need the same number (>= {minimum}) of student and teacher levels, "
                         f"got {len(feats_s)} and {len(feats_t)}")
    for i, (s, t) in enumerate(zip(feats_s, feats_t, strict=True)):
        if s.shape != t.shape:
            raise ValueError(f"level {i}: student {tuple(s.shape)} != teacher {tuple(t.shape)}")


def internal_loss(feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor],
                  stats: Sequence[str] = STATS) -> torch.Tensor:
    """L_int = mean over levels l and statistics k of
    mean_b || n(s_k(f_S^l)) - n(s_k(f_T^l)) ||_2, with n(v) = v / max(||v||_2, 1e-8)."""
    check_levels(feats_student, feats_teacher, 1)
    if not stats:
        raise ValueError("stats must name at least one statistic")
    terms = []
    for fs, ft in zip(feats_student, feats_teacher, strict=True):
        for stat in stats:
            s = F.normalize(feature_statistic(fs, stat), dim=1, eps=NORM_EPS)
            t = F.normalize(feature_statistic(ft.detach(), stat), dim=1, eps=NORM_EPS)
            terms.append((s - t).norm(dim=1).mean())
    return torch.stack(terms).mean()


def energy_map(f: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """e = mean over C of f^2 (float32), adaptive-average-pooled to `size` when it differs,
    then standardised per sample over its pixels: (e - mean) / sqrt(var + 1e-5)."""
    e = upcast(f).pow(2).mean(dim=1, keepdim=True)
    return standardise_energy(e, size)


def standardise_energy(e: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An energy map (B, 1, H, W) adaptive-average-pooled to `size` when it differs, then
    standardised per sample over its pixels: (e - mean) / sqrt(var + 1e-5)."""
    if size is not None and tuple(e.shape[-2:]) != tuple(size):
        e = F.adaptive_avg_pool2d(e, size)
    mean = e.mean(dim=(2, 3), keepdim=True)
    var = e.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (e - mean) / torch.sqrt(var + STD_EPS)


class MSCA(nn.Module):
    """SegNeXt's multi-scale convolutional attention branch structure on a 1-channel map:
    MSCA(x) = A + sum_k DWkx1(DW1xk(A)), A = DW5x5(x), size-preserving zero padding.

    fixed (default): every kernel is an averaging kernel (equal weights summing to 1), made
    on the fly: no parameters, no state. learned: the same kernels as trainable parameters,
    initialised to the averaging ones (SegNeXt-style, to be frozen after the step that trains
    them)."""

    def __init__(self, kernels: Sequence[int] = MSCA_KERNELS, learned: bool = False):
        super().__init__()
        if not kernels or any(k <= 0 or k % 2 == 0 for k in kernels):
            raise ValueError(f"MSCA kernels must be odd positive sizes, got {kernels}")
        self.kernels = tuple(kernels)
        self.learned = learned
        if learned:
            for name, shape in self._shapes().items():
                self.register_parameter(name, nn.Parameter(torch.full(shape, 1 / math.prod(shape))))

    def _shapes(self) -> dict[str, tuple[int, int, int, int]]:
        shapes = {"w5": (1, 1, 5, 5)}
        for k in self.kernels:
            shapes[f"w1x{k}"] = (1, 1, 1, k)
            shapes[f"w{k}x1"] = (1, 1, k, 1)
        return shapes

    def _weight(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.learned:
            return getattr(self, name).to(x.dtype)
        # Fixed kernels are made in the input's dtype, so 1/k is exact to that precision.
        shape = self._shapes()[name]
        return torch.full(shape, 1 / math.prod(shape), dtype=x.dtype, device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MSCA of x (B, 1, H, W), same shape, in the accumulation dtype."""
        x = upcast(x)
        a = F.conv2d(x, self._weight("w5", x), padding=2)
        out = a
        for k in self.kernels:
            row = F.conv2d(a, self._weight(f"w1x{k}", x), padding=(0, k // 2))
            out = out + F.conv2d(row, self._weight(f"w{k}x1", x), padding=(k // 2, 0))
        return out


def cross_scale_relation(f_fine: torch.Tensor, f_coarse: torch.Tensor, msca: MSCA,
                         tau: float) -> torch.Tensor:
    """log of r = softmax over pixels of (MSCA(e_fine) * MSCA(e_coarse)) / tau, (B, H*W),
    where e_fine is pooled to the coarser level's size."""
    size = tuple(f_coarse.shape[-2:])
    e_fine = energy_map(f_fine, size)
    e_coarse = energy_map(f_coarse)
    logits = (msca(e_fine) * msca(e_coarse)).flatten(1) / tau
    return F.log_softmax(logits, dim=1)


def external_loss(feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor],
                  tau: float = 1.0, msca: str | MSCA = "fixed",
                  kernels: Sequence[int] = MSCA_KERNELS) -> torch.Tensor:
    """L_ext = (1/(L-1)) * sum over adjacent levels of tau^2 * mean_b KL(r_T || r_S).

    `msca` is "fixed" (averaging kernels) or an MSCA module (e.g. a learned one)."""
    check_levels(feats_student, feats_teacher, 2)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if isinstance(msca, str):
        if msca != "fixed":
            raise ValueError(f"msca={msca!r} needs an MSCA module; pass MSCA(learned=True)")
        msca = MSCA(kernels).to(feats_student[0].device)
    terms = []
    for l in range(len(feats_student) - 1):  # noqa: E741 - l is the paper's level index
        log_r_s = cross_scale_relation(feats_student[l], feats_student[l + 1], msca, tau)
        with torch.no_grad():
            log_r_t = cross_scale_relation(feats_teacher[l], feats_teacher[l + 1], msca, tau)
        terms.append(relation_kl(log_r_t, log_r_s, tau))
    return torch.stack(terms).mean()


def relation_kl(log_r_teacher: torch.Tensor, log_r_student: torch.Tensor,
                tau: float) -> torch.Tensor:
    """tau^2 * mean over samples of KL(r_T || r_S), from the log-relations (B, P)."""
    kl = (log_r_teacher.exp() * (log_r_teacher - log_r_student)).sum(dim=1)
    return tau**2 * kl.mean()
