"""ICD's distillation as a module (the module layer of the kernel stack: kernels/ hold the
fused kernels, kernels/dispatch.icd_terms is the functional, icd.py the reference).

ICDLoss holds the options of `loss.icd` and returns the weighted internal and external
terms, lambda_int * L_int and lambda_ext * L_ext; a weight of 0 skips its term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from icd_dist.losses.icd import MSCA
from icd_dist.losses.kernels.dispatch import icd_terms


class ICDLoss(nn.Module):
    """lambda_int * L_int and lambda_ext * L_ext (ICD_METHOD.md) between student and teacher
    feature taps. With `learned_msca` the MSCA is the caller's (the model's learned one,
    passed to forward); otherwise fixed averaging kernels of `msca_kernels`."""

    def __init__(self, lambda_int: float = 1.0, lambda_ext: float = 10.0,
                 stats: Sequence[str] = ("mean", "std", "max", "spatial_mean", "spatial_std"),
                 tau: float = 1.0, msca_kernels: Sequence[int] = (7, 11, 21),
                 learned_msca: bool = False, impl: str = "auto"):
        super().__init__()
        self.lambda_int = lambda_int
        self.lambda_ext = lambda_ext
        self.stats = tuple(stats)
        self.tau = tau
        self.impl = impl
        self.learned_msca = learned_msca
        self.msca = None if learned_msca else MSCA(msca_kernels)

    @classmethod
    def from_config(cls, icd_cfg) -> ICDLoss:
        """The loss of an ICDLossConfig (`loss.icd`)."""
        return cls(icd_cfg.lambda_int, icd_cfg.lambda_ext, icd_cfg.stats, icd_cfg.tau,
                   icd_cfg.msca_kernels, icd_cfg.msca == "learned", icd_cfg.impl)

    def forward(self, feats_student: Sequence[torch.Tensor],
                feats_teacher: Sequence[torch.Tensor],
                msca: MSCA | None = None) -> dict[str, torch.Tensor]:
        """{"int": lambda_int * L_int, "ext": lambda_ext * L_ext}, each only where its weight
        is positive. `msca`: the learned MSCA, required exactly when learned_msca."""
        if (msca is not None) != self.learned_msca:
            raise ValueError("pass the model's MSCA exactly when loss.icd.msca=learned")
        internal, external = icd_terms(
            feats_student, feats_teacher, stats=self.stats, tau=self.tau,
            msca=msca if msca is not None else self.msca,
            want_internal=self.lambda_int > 0, want_external=self.lambda_ext > 0,
            impl=self.impl)
        out = {}
        if internal is not None:
            out["int"] = self.lambda_int * internal
        if external is not None:
            out["ext"] = self.lambda_ext * external
        return out
