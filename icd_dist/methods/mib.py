"""mib: MiB (Cermelli et al., CVPR 2020): unbiased CE + lambda_kd * unbiased KD on the
logits, MiB's classifier init."""

from __future__ import annotations

from icd_dist.config import SearchDim
from icd_dist.losses import css
from icd_dist.methods.base import Method


class MiB(Method):
    """MiB (Cermelli et al., CVPR 2020): unbiased CE + lambda_kd * unbiased KD, MiB init."""

    name = "mib"
    default_seg = "unbiased_ce"
    method_loss_keys = ("loss.lambda_kd", "loss.kd_alpha")
    # MiB: lambda_kd 10 (100 for 15-1, its issue 22)
    search_weights = (SearchDim("loss.lambda_kd", "loguniform", (1.0, 100.0)),)

    def distillation(self, student, teacher, labels):
        """lambda_kd * unbiased KD on the logits (averaged over all pixels); nothing when
        lambda_kd is 0."""
        lc = self.cfg.loss
        if lc.lambda_kd <= 0:
            return {}
        return {"kd": lc.lambda_kd * css.unbiased_kd(student.logits, teacher.logits,
                                                     alpha=lc.kd_alpha)}
