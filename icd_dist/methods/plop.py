"""plop: PLOP (Douillard et al., CVPR 2021): CE on entropy-thresholded pseudo-labels
(per-image classification factor) + s_t * (lambda_pod * sum_l POD_l + lambda_pod_logits *
POD_logits) / (L + 1), Local POD on the five taps and the head-resolution logits."""

from __future__ import annotations

from icd_dist.config import SearchDim
from icd_dist.losses import css
from icd_dist.methods.base import Method


class PLOP(Method):
    """PLOP (Douillard et al., CVPR 2021): CE on entropy-thresholded pseudo-labels weighted
    per image + Local POD on the five taps and the head-resolution logits."""

    name = "plop"
    default_seg = "pseudo_ce"
    method_loss_keys = ("loss.pod.",)
    # PLOP: 0.01 / 0.0005 on VOC, 0.001 / 0.00001 on ADE20K
    search_weights = (SearchDim("loss.pod.lambda_pod", "loguniform", (1e-4, 1e-1)),
                      SearchDim("loss.pod.lambda_pod_logits", "loguniform", (1e-6, 1e-2)))

    def distillation(self, student, teacher, labels):
        """s_t * PLOP's POD term (css.plop_pod)."""
        pod = self.cfg.loss.pod
        if student.head_logits is None or teacher.head_logits is None:
            raise ValueError("PLOP's POD needs the logits at the head's resolution")
        term = css.plop_pod(student.features, teacher.features, student.head_logits,
                            teacher.head_logits, pod.lambda_pod, pod.lambda_pod_logits,
                            pod.scales, pod.regions, pod.normalize)
        return {"pod": self.factor * term}
