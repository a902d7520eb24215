"""`loss.icd.impl`: which implementation computes the ICD losses.

- eager: the readable reference, losses/icd.py.
- compiled: moments by torch ops and the small math, the whole under torch.compile (the CPU
  default; the first call in a process compiles for about 40 s on a 2-core CPU, later
  processes load inductor's on-disk cache).
- triton: moments by the Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1), the small
  math in torch on the (B, C) and (B, H*W) moments.
- auto: triton for CUDA features when Triton imports, compiled otherwise.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from icd_dist.losses import icd
from icd_dist.losses.kernels import moments as fused

IMPLS = ("auto", "triton", "compiled", "eager")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported in this environment."""
    try:
        import icd_dist.losses.kernels.triton_moments  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation (triton, compiled or eager) that `impl` means for features
    on `device`; raises ValueError for an unknown name or a choice that cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"loss.icd.impl={impl!r}; allowed: {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "compiled"
    if impl == "triton":
        if not triton_available():
            raise ValueError("loss.icd.impl=triton but Triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"loss.icd.impl=triton needs CUDA features (got {device.type}); "
                             "on CPU use compiled or eager, or TRITON_INTERPRET=1 for checks")
    return impl


def _terms_from_moments(ms, mt, stats, tau, msca, want_int, want_ext):
    internal = fused.internal_from_moments(ms, mt, stats) if want_int else None
    external = fused.external_from_moments(ms, mt, msca, tau) if want_ext else None
    return internal, external


def _terms_torch(feats_s, feats_t, stats, tau, msca, want_int, want_ext):
    ms = [fused.moments_torch(f) for f in feats_s]
    with torch.no_grad():
        mt = [fused.moments_torch(f) for f in feats_t]
    return _terms_from_moments(ms, mt, stats, tau, msca, want_int, want_ext)


@functools.cache
def _compiled_terms():
    # Static shapes except the batch (marked per call): automatic dynamic shapes would make
    # the map sizes symbolic, which inductor cannot compile for adaptive pooling. Each new
    # set of tap shapes, dtypes, stats or tau is a recompile; past dynamo's default limit of 8
    # it would silently run eagerly, so the limit is raised for this function's sake.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_terms_torch, dynamic=False)


def _terms_triton(feats_s, feats_t, stats, tau, msca, want_int, want_ext):
    from icd_dist.losses.kernels.triton_moments import moments_triton

    ms = [moments_triton(f) for f in feats_s]
    with torch.no_grad():
        mt = [moments_triton(f) for f in feats_t]
    return _terms_from_moments(ms, mt, stats, tau, msca, want_int, want_ext)


def icd_terms(feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor], *,
              stats: Sequence[str] = icd.STATS, tau: float = 1.0, msca: icd.MSCA | None = None,
              want_internal: bool = True, want_external: bool = True,
              impl: str = "auto") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(L_int, L_ext) of ICD_METHOD.md by the implementation `impl`; a term not wanted is
    None. The fused implementations read each feature tensor once for both terms."""
    icd.check_levels(feats_student, feats_teacher, 2 if want_external else 1)
    if not stats and want_internal:
        raise ValueError("stats must name at least one statistic")
    bad = [s for s in stats if s not in icd.STATS]
    if bad:
        raise ValueError(f"unknown statistic {bad[0]!r}; allowed: {', '.join(icd.STATS)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    msca = msca if msca is not None else icd.MSCA()
    concrete = resolve_impl(impl, feats_student[0].device)
    if concrete == "eager":
        internal = icd.internal_loss(feats_student, feats_teacher, stats) \
            if want_internal else None
        external = icd.external_loss(feats_student, feats_teacher, tau, msca) \
            if want_external else None
        return internal, external
    student, teacher = list(feats_student), [f.detach() for f in feats_teacher]
    if concrete == "triton":
        terms = _terms_triton
    else:
        terms = _compiled_terms()
        # The batch may shrink (an epoch's last batch, skipped bad samples): compile for any
        # batch size once instead of recompiling (about a minute on a small CPU) when it does.
        for f in (*student, *teacher):
            torch._dynamo.maybe_mark_dynamic(f, 0)
    return terms(student, teacher, tuple(stats), float(tau), msca, want_internal,
                 want_external)
