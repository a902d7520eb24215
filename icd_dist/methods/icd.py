"""icd: ICD (Internal-External Constrained Distillation, PRCV 2023; ICD_METHOD.md): MiB's
unbiased CE and KD + s_t * (lambda_int * L_int + lambda_ext * L_ext) on the five taps
(s_t off: loss.icd.adaptive_factor=false).

`loss.icd.msca=learned`: the MSCA kernels are parameters of the model (`model.msca`), so the
engines synchronise, checkpoint and carry them to the next step like every other weight.
They are trained at step 1, the first step with a teacher, and frozen from step 2 on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from icd_dist.config import Config, SearchDim
from icd_dist.css.tasks import Task
from icd_dist.losses.icd import MSCA
from icd_dist.losses.icd_loss import ICDLoss
from icd_dist.methods.base import METHOD_STATE_PREFIXES
from icd_dist.methods.mib import MiB
from icd_dist.models.deeplab import DeepLabV3


class ICD(MiB):
    """ICD: unbiased CE + unbiased KD + s_t * (internal + external distillation)."""

    name = "icd"
    method_loss_keys = (*MiB.method_loss_keys, "loss.icd.")
    # ICD_METHOD.md: lambda_int 1, lambda_ext 10, tau 1, on MiB's lambda_kd 10. Also the
    # choices the abstract leaves open: which statistics the internal term matches (all,
    # the per-channel ones, the per-pixel ones) and the segmentation loss (MiB's unbiased
    # CE, or PLOP's pseudo-labelled CE: "previous methods distil features at the same level"
    # is PLOP's POD). The bottoms of the weight ranges switch a term off in effect (L_int
    # ~0.04, L_ext ~1e-3 against a CE near 1), so a search can turn a term down.
    search_weights = (SearchDim("loss.icd.lambda_int", "loguniform", (0.01, 100.0)),
                      SearchDim("loss.icd.lambda_ext", "loguniform", (0.1, 1000.0)),
                      SearchDim("loss.lambda_kd", "loguniform", (1.0, 100.0)),
                      SearchDim("loss.icd.tau", "choice", (0.5, 1.0, 2.0)),
                      SearchDim("loss.icd.stats", "choice", (
                          ("mean", "std", "max", "spatial_mean", "spatial_std"),
                          ("mean", "std", "max"), ("spatial_mean", "spatial_std"))),
                      SearchDim("loss.seg", "choice", ("unbiased_ce", "pseudo_ce")))

    def __init__(self, cfg: Config, task: Task, step: int):
        super().__init__(cfg, task, step)
        self.icd = ICDLoss.from_config(cfg.loss.icd)
        # The model's learned MSCA, held without registering it as a submodule of the loss.
        self._learned: tuple[MSCA, ...] = ()

    @property
    def learned_msca(self) -> bool:
        """Whether the MSCA kernels are weights of the model (loss.icd.msca=learned)."""
        return self.icd.learned_msca

    def init_student(self, model: DeepLabV3, state: Mapping[str, torch.Tensor]) -> None:
        """As Method, plus the learned MSCA: carried from the previous model from step 2 on,
        new (the averaging kernels) at step 1; trainable only at step 1."""
        if self.learned_msca and any(k.startswith(METHOD_STATE_PREFIXES) for k in state):
            self._attach_msca(model)
            super().init_student(model, state)
            return
        super().init_student(model, state)
        if self.learned_msca:
            self._attach_msca(model)

    def _attach_msca(self, model: nn.Module) -> None:
        msca = MSCA(self.cfg.loss.icd.msca_kernels, learned=True)
        msca.requires_grad_(self.step == 1)
        model.add_module("msca", msca)
        self._learned = (msca,)

    def distillation(self, student, teacher, labels):
        """Unbiased KD and s_t * (lambda_int * L_int + lambda_ext * L_ext)."""
        parts = MiB.distillation(self, student, teacher, labels)
        factor = self.factor if self.cfg.loss.icd.adaptive_factor else 1.0
        msca = self._learned[0] if self._learned else None
        if self.learned_msca and msca is None:
            raise RuntimeError("loss.icd.msca=learned: init_student() attaches the model's "
                               "MSCA before training")
        for key, value in self.icd(student.features, teacher.features, msca).items():
            parts[key] = factor * value
        return parts
