"""One loss object per method (ft, joint, mib, plop, icd): from the config and the step, the
step's total loss and its components.

At step 0 every method trains with plain cross-entropy (there is no teacher), so step 0 does
not depend on any distillation setting. At step t > 0:

- ft:    CE
- joint: CE, every class in one (offline) step
- mib:   unbiased CE + lambda_kd * unbiased KD
- plop:  CE on pseudo-labels
         + s_t * lambda_pod * (sum_l POD_l + lambda_pod_logits * POD_logits) / (L + 1)
- icd:   unbiased CE + lambda_kd * unbiased KD
         + s_t * (lambda_int * L_int + lambda_ext * L_ext)   (s_t off: adaptive_factor=false)

(`loss.seg` swaps the segmentation term; s_t = sqrt(|C_0:t| / |C_t|).)

`loss.icd.msca=learned`: the MSCA kernels are parameters of the model (`model.msca`, added by
attach_learned_msca), so the engines synchronise, checkpoint and carry them to the next step
like every other weight. They are trained at step 1, the first step with a teacher, and
frozen from step 2 on (and at step 0, which has no distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.config import Config, ConfigError
from icd_dist.css.tasks import Task
from icd_dist.losses import css
from icd_dist.losses.icd import MSCA
from icd_dist.losses.kernels.dispatch import icd_terms
from icd_dist.losses.precision import upcast
from icd_dist.models.deeplab import SegOutput

IGNORE_INDEX = 255
_DEFAULT_SEG = {"ft": "ce", "joint": "ce", "mib": "unbiased_ce", "plop": "pseudo_ce",
                "icd": "unbiased_ce"}


class StepLoss(nn.Module):
    """The loss of one method at one step: call it with the student's and the teacher's
    outputs (teacher None at step 0) and the step's training labels; it returns the total
    loss and a dict of detached components (seg, kd, pod, int, ext, total as present)."""

    def __init__(self, cfg: Config, task: Task, step: int):
        super().__init__()
        self.method = cfg.method.name
        if self.method == "joint" and task.num_steps != 1:
            raise ConfigError("method.name", f"joint trains every class in one step; use "
                              f"task.name=offline (task {task.name!r} has {task.num_steps} steps)")
        self.step = step
        self.num_old = len(task.old_classes(step))
        self.num_seen = task.num_seen(step)
        self.factor = css.adaptive_factor(self.num_seen, len(task.classes_at(step))) \
            if step > 0 else 1.0
        self.loss_cfg = cfg.loss
        seg = cfg.loss.seg if cfg.loss.seg != "auto" else _DEFAULT_SEG[self.method]
        if step > 0 and self.method in ("ft", "joint") and seg != "ce":
            raise ConfigError("loss.seg", f"method {self.method!r} trains with plain CE; "
                              f"got {seg!r}")
        self.seg = seg if step > 0 else "ce"
        self.thresholds: torch.Tensor | None = None
        self.msca: MSCA | None = None
        self.learned_msca = self.method == "icd" and cfg.loss.icd.msca == "learned"
        if self.method == "icd" and not self.learned_msca:
            self.msca = MSCA(cfg.loss.icd.msca_kernels)

    @property
    def needs_teacher(self) -> bool:
        """Whether this step's loss uses the previous step's model."""
        return self.step > 0 and self.method != "ft" and self.method != "joint"

    @property
    def needs_pseudo_thresholds(self) -> bool:
        """Whether set_pseudo_thresholds must be called before training (PLOP pseudo-labels)."""
        return self.seg == "pseudo_ce"

    def set_pseudo_thresholds(self, thresholds: torch.Tensor) -> None:
        """Per-old-class entropy thresholds (css.EntropyHistogram.thresholds)."""
        if thresholds.shape != (self.num_old,):
            raise ValueError(f"need {self.num_old} thresholds, got {tuple(thresholds.shape)}")
        self.thresholds = thresholds

    def forward(self, student: SegOutput, teacher: SegOutput | None, labels: torch.Tensor,
                msca: MSCA | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its components. `msca` is the student model's learned MSCA (needed,
        and only allowed, with loss.icd.msca=learned)."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{self.method} at step {self.step} needs the teacher's outputs")
        if (msca is not None) != (self.learned_msca and self.step > 0):
            raise ValueError("pass the model's MSCA exactly when loss.icd.msca=learned "
                             f"(method {self.method}, step {self.step})")
        parts: dict[str, torch.Tensor] = {"seg": self._segmentation(student, teacher, labels)}
        lc = self.loss_cfg
        if self.step > 0 and self.method in ("mib", "icd") and lc.lambda_kd > 0:
            parts["kd"] = lc.lambda_kd * css.unbiased_kd(student.logits, teacher.logits,
                                                         alpha=lc.kd_alpha)
        if self.step > 0 and self.method == "plop":
            parts["pod"] = self._pod(student, teacher)
        if self.step > 0 and self.method == "icd":
            icd = lc.icd
            factor = self.factor if icd.adaptive_factor else 1.0
            internal, external = icd_terms(
                student.features, teacher.features, stats=icd.stats, tau=icd.tau,
                msca=msca if msca is not None else self.msca, want_internal=icd.lambda_int > 0,
                want_external=icd.lambda_ext > 0, impl=icd.impl)
            if internal is not None:
                parts["int"] = factor * icd.lambda_int * internal
            if external is not None:
                parts["ext"] = factor * icd.lambda_ext * external
        total = torch.stack(list(parts.values())).sum()
        components = {k: v.detach() for k, v in parts.items()}
        components["total"] = total.detach()
        return total, components

    def _segmentation(self, student: SegOutput, teacher: SegOutput | None,
                      labels: torch.Tensor) -> torch.Tensor:
        if self.seg == "ce":
            return F.cross_entropy(upcast(student.logits), labels.long(),
                                   ignore_index=IGNORE_INDEX)
        if self.seg == "unbiased_ce":
            return css.unbiased_cross_entropy(student.logits, labels, self.num_old)
        if self.thresholds is None:
            raise RuntimeError("pseudo_ce needs set_pseudo_thresholds() before training")
        pseudo, weights = css.pseudo_label(labels, teacher.logits, self.thresholds)
        return css.pseudo_label_cross_entropy(student.logits, pseudo, weights)

    def _pod(self, student: SegOutput, teacher: SegOutput) -> torch.Tensor:
        pod = self.loss_cfg.pod
        levels = [css.local_pod_distance(s, t, pod.scales)
                  for s, t in zip(student.features, teacher.features, strict=True)]
        logits = css.local_pod_logits(student.logits, teacher.logits, pod.scales)
        # PLOP averages over the feature levels and the logits, the logits term scaled down.
        mean = (torch.stack(levels).sum() + pod.lambda_pod_logits * logits) / (len(levels) + 1)
        return self.factor * pod.lambda_pod * mean


LEARNED_MSCA_PREFIX = "msca."


def without_learned_msca(state: dict) -> dict:
    """A model state dict without the learned MSCA's entries (which only the loss reads: a
    teacher or an evaluated model does not need them)."""
    return {k: v for k, v in state.items() if not k.startswith(LEARNED_MSCA_PREFIX)}


def attach_learned_msca(cfg: Config, model: nn.Module, step: int) -> MSCA | None:
    """With loss.icd.msca=learned (method icd): add `model.msca`, a learned MSCA initialised
    to the averaging kernels, trainable only at step 1 (frozen at step 0 and from step 2
    on); returns it. Otherwise leave the model alone and return None. Call it before loading
    a state dict saved from such a model."""
    if cfg.method.name != "icd" or cfg.loss.icd.msca != "learned":
        return None
    msca = MSCA(cfg.loss.icd.msca_kernels, learned=True)
    msca.requires_grad_(step == 1)
    model.add_module(LEARNED_MSCA_PREFIX[:-1], msca)
    return msca


def build_step_loss(cfg: Config, task: Task, step: int) -> StepLoss:
    """The loss object of `cfg.method` at `step` of `task`."""
    return StepLoss(cfg, task, step)
