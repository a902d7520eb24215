"""The base of every continual-learning method (the methods/ package docstring says what a
method owns): one method at one step of a task, an nn.Module computing the step's loss.

Every segmentation loss is averaged over all pixels of the batch, ignored ones counting 0
(MiB's and PLOP's train.py: reduction='none', then .mean()); `loss.seg` swaps the
segmentation term of steps t > 0; s_t = sqrt(|C_0:t| / |C_t|) is PLOP's adaptive factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import torch
from torch import nn

from icd_dist.config import Config, ConfigError, SearchDim
from icd_dist.css.tasks import Task
from icd_dist.losses import css
from icd_dist.models.deeplab import DeepLabV3, SegOutput

SEG_LOSSES = ("ce", "unbiased_ce", "pseudo_ce")
# The loss keys pseudo_ce reads, whichever method trains with it.
PSEUDO_LABEL_KEYS = ("loss.pod.thresholds", "loss.pod.bins", "loss.pod.entropy_floor")
# Entries of a model's state dict that belong to a method, not to the network.
METHOD_STATE_PREFIXES = ("msca.",)

# A pass over the step's training data: yields (images, labels) on the worker's device.
DataPass = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def inference_state(state: Mapping[str, object]) -> dict:
    """A model state dict without the entries methods own (a learned MSCA, which only the
    loss reads): what a teacher or an evaluated model loads."""
    return {k: v for k, v in state.items() if not k.startswith(METHOD_STATE_PREFIXES)}


class Method(nn.Module):
    """One method at one step of a task (see the module docstring)."""

    name: ClassVar[str]
    default_seg: ClassVar[str] = "ce"
    allowed_seg: ClassVar[tuple[str, ...]] = SEG_LOSSES
    uses_teacher: ClassVar[bool] = True
    default_mib_init: ClassVar[bool] = True
    classifier: ClassVar[str] = "standard"  # the model.classifier the method trains

    # Whether its step 0 is its own (step0_identity not {}), not the CE step 0 it shares.
    trains_own_step0: ClassVar[bool] = False
    # Whether it trains every class in one offline step (an upper bound, not continual).
    offline: ClassVar[bool] = False
    # The loss.* keys (prefixes) the method reads besides loss.seg and pseudo_ce's.
    method_loss_keys: ClassVar[tuple[str, ...]] = ()
    # The method's own weights and their default ranges (around its authors' values).
    search_weights: ClassVar[tuple[SearchDim, ...]] = ()

    def __init__(self, cfg: Config, task: Task, step: int):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.step = step
        self.num_old = len(task.old_classes(step))
        self.num_new = len(task.classes_at(step))
        self.num_seen = task.num_seen(step)
        self.factor = css.adaptive_factor(self.num_seen, self.num_new) if step > 0 else 1.0
        seg = cfg.loss.seg if cfg.loss.seg != "auto" else self.default_seg
        self.seg = seg if step > 0 else "ce"
        self.mib_init = cfg.model.mib_init if cfg.model.mib_init is not None \
            else self.default_mib_init
        self.thresholds: torch.Tensor | None = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """ConfigError naming the key where `cfg` breaks one of the method's rules: the
        segmentation loss of its steps t > 0 and the classifier it trains."""
        seg = cfg.loss.seg if cfg.loss.seg != "auto" else cls.default_seg
        if seg not in cls.allowed_seg:
            raise ConfigError("loss.seg", f"method {cls.name!r} trains with "
                              f"{', '.join(cls.allowed_seg)}; got {seg!r}")
        if cfg.model.classifier != cls.classifier:
            raise ConfigError("model.classifier", f"method {cls.name!r} trains the "
                              f"{cls.classifier!r} classifier; got {cfg.model.classifier!r}")

    @classmethod
    def loss_keys(cls) -> tuple[str, ...]:
        """The loss.* keys the method reads (a key, or a prefix ending in "." for a
        section)."""
        seg = ("loss.seg", *PSEUDO_LABEL_KEYS) if "pseudo_ce" in cls.allowed_seg \
            else ("loss.seg",)
        return (*seg, *cls.method_loss_keys)

    @classmethod
    def search_space(cls, cfg: Config) -> tuple[SearchDim, ...]:
        """What `tune.space: method` searches: the method's weights (search_weights) and
        optim.lr_incremental log-uniform over a decade either side of cfg's."""
        lr = cfg.optim.lr_incremental
        return (*cls.search_weights, SearchDim("optim.lr_incremental", "loguniform",
                                               (lr / 10, lr * 10)))

    @property
    def needs_teacher(self) -> bool:
        """Whether this step's loss uses the previous step's model."""
        return self.step > 0 and (self.uses_teacher or self.seg == "pseudo_ce")

    def init_student(self, model: DeepLabV3, state: Mapping[str, torch.Tensor]) -> None:
        """Step t > 0: load the previous step's weights, then add this step's classifier
        head (MiB's init or the layer's default random init, as `mib_init` says)."""
        model.load_state_dict(dict(state))
        model.add_step(self.num_new, mib_init=self.mib_init)

    def set_train_mode(self, model: nn.Module) -> None:
        """After model.train() at every epoch: the method's module modes (none by default)."""

    def param_groups(self, model: nn.Module, params: list[nn.Parameter],
                     lr: float) -> list:
        """The optimiser's parameter groups over the trainable `params` (by default one
        group at the base lr)."""
        return list(params)

    @classmethod
    def step0_identity(cls, cfg: Config) -> dict:
        """The method's settings that shape its step-0 model besides the model, data and
        step-0 optimisation ({}: step 0 is the plain CE every such method shares)."""
        return {}

    def prepare(self, teacher: nn.Module | None, data_pass: DataPass) -> None:
        """Per-step state before training (PLOP's pseudo-label thresholds); most methods
        have none."""
        if self.seg == "pseudo_ce":
            self._set_thresholds(teacher, data_pass)

    def forward(self, student: SegOutput, teacher: SegOutput | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its components (detached): seg, then the method's terms."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{self.name} at step {self.step} needs the teacher's outputs")
        parts = {"seg": self._segmentation(student, teacher, labels)}
        if self.step > 0:
            parts.update(self.distillation(student, teacher, labels))
        total = torch.stack(list(parts.values())).sum()
        components = {k: v.detach() for k, v in parts.items()}
        components["total"] = total.detach()
        return total, components

    def distillation(self, student: SegOutput, teacher: SegOutput | None,
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's terms besides the segmentation loss at step t > 0."""
        return {}

    # Segmentation losses, each averaged over all pixels of the batch (MiB, PLOP).
    def _segmentation(self, student: SegOutput, teacher: SegOutput | None,
                      labels: torch.Tensor) -> torch.Tensor:
        if self.seg == "ce":
            return css.cross_entropy(student.logits, labels, reduction="none").mean()
        if self.seg == "unbiased_ce":
            return css.unbiased_cross_entropy(student.logits, labels, self.num_old,
                                              reduction="none").mean()
        if self.thresholds is None:
            raise RuntimeError("pseudo_ce needs prepare() (the entropy thresholds) first")
        pod = self.cfg.loss.pod
        pseudo, weights = css.pseudo_label(labels, teacher.logits, self.thresholds,
                                           self.num_seen, pod.thresholds)
        return css.pseudo_label_cross_entropy(student.logits, pseudo, weights)

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        """PLOP's per-seen-class entropy thresholds (css.EntropyHistogram.thresholds)."""
        if thresholds.shape != (self.num_seen,):
            raise ValueError(f"need {self.num_seen} thresholds, got {tuple(thresholds.shape)}")
        self.thresholds = thresholds

    @torch.no_grad()
    def _set_thresholds(self, teacher: nn.Module, data_pass: DataPass) -> None:
        pod = self.cfg.loss.pod
        weight = next(teacher.parameters())
        hist = css.EntropyHistogram(self.num_seen, pod.bins, pod.thresholds, device=weight.device)
        for images, labels in data_pass():
            hist.update(teacher(images.to(weight.dtype)).logits, labels)
        self.set_thresholds(hist.all_reduce().thresholds(pod.entropy_floor).to(weight.device))
