"""The continual-learning methods, one class each in a registry (ft, joint, mib, plop, icd,
dkd).

A method owns its config section and its per-step state, so the training loop and
`evaluate` do not know any method's internals:
- `init_student(model, state)`: at step t > 0, load the previous model's weights into the
  student and add this step's classes with the method's classifier init (random for ft, MiB's
  for the others unless model.mib_init says otherwise); ICD's learned MSCA lives here;
- `prepare(teacher, data_pass)`: per-step state computed before training (PLOP's entropy
  thresholds, from one pass of the teacher over the step's training data);
- `forward(student, teacher, labels)`: the step's total loss and its detached components;
- `set_train_mode(model)`: after model.train() every epoch, the method's module modes (DKD:
  frozen BatchNorm statistics and no dropout at t > 0);
- `param_groups(model, params, lr)`: the optimiser's parameter groups (DKD: the head and
  classifiers at ten times the backbone's lr);
- `step0_identity(cfg)`: the method's settings that shape its step-0 model, for the shared
  step 0's key ({} for the CE-trained step 0 of every method but DKD);
- `check_config(cfg)`: the method's rules on a config (its segmentation losses, classifier);
- `loss_keys`: the loss.* keys it reads (a sweep may search only those of loss.*);
- `search_space(cfg)`: what `tune.space: method` searches, its weights and the incremental
  learning rate (a decade either side of the config's), each a SearchDim.

At step 0 every method but DKD trains with plain cross-entropy (there is no teacher), so
step 0 does not depend on any distillation setting. At step t > 0:

- ft:    CE
- joint: CE, every class in one (offline) step
- mib:   unbiased CE + lambda_kd * unbiased KD
- plop:  CE on pseudo-labels (per-image classification factor)
         + s_t * (lambda_pod * sum_l POD_l + lambda_pod_logits * POD_logits) / (L + 1)
- icd:   unbiased CE + lambda_kd * unbiased KD
         + s_t * (lambda_int * L_int + lambda_ext * L_ext)   (s_t off: adaptive_factor=false)
- dkd:   mbce * L_mBCE + kd * L_KD + dkd_pos * L_pos + dkd_neg * L_neg + ac * L_AC on DKD's
         sigmoid classifier (losses/dkd.py); its step 0 trains mbce * L_mBCE + ac * L_AC

`loss.seg` swaps the segmentation term; s_t = sqrt(|C_0:t| / |C_t|). Every segmentation
loss is averaged over all pixels of the batch, ignored ones counting 0 (MiB's and PLOP's
train.py: reduction='none', then .mean()).

`loss.icd.msca=learned`: the MSCA kernels are parameters of the model (`model.msca`), so the
engines synchronise, checkpoint and carry them to the next step like every other weight.
They are trained at step 1, the first step with a teacher, and frozen from step 2 on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import torch
from torch import nn

from icd_dist.config import Config, ConfigError, SearchDim
from icd_dist.css.tasks import Task
from icd_dist.losses import css, dkd
from icd_dist.losses.icd import MSCA
from icd_dist.losses.icd_loss import ICDLoss
from icd_dist.models.deeplab import DeepLabV3, SegOutput

SEG_LOSSES = ("ce", "unbiased_ce", "pseudo_ce")
# The loss keys pseudo_ce reads, whichever method trains with it.
PSEUDO_LABEL_KEYS = ("loss.pod.thresholds", "loss.pod.bins", "loss.pod.entropy_floor")
# Entries of a model's state dict that belong to a method, not to the network.
METHOD_STATE_PREFIXES = ("msca.",)

# A pass over the step's training data: yields (images, labels) on the worker's device.
DataPass = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method available as method.name=`name`."""
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


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

    # The loss.* keys (prefixes) the method reads besides loss.seg and pseudo_ce's.
    method_loss_keys: ClassVar[tuple[str, ...]] = ()

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

    # The method's own weights and their default ranges (around its authors' values).
    search_weights: ClassVar[tuple[SearchDim, ...]] = ()

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


@register("ft")
class FineTuning(Method):
    """Fine-tuning: CE on the step's labels, a randomly initialised new head (lower bound)."""

    allowed_seg = ("ce",)
    uses_teacher = False
    default_mib_init = False


@register("joint")
class Joint(Method):
    """Every class in one offline step with CE (upper bound)."""

    allowed_seg = ("ce",)
    uses_teacher = False
    default_mib_init = False

    def __init__(self, cfg: Config, task: Task, step: int):
        if task.num_steps != 1:
            raise ConfigError("method.name", f"joint trains every class in one step; use "
                              f"task.name=offline (task {task.name!r} has {task.num_steps} "
                              f"steps)")
        super().__init__(cfg, task, step)

    @classmethod
    def search_space(cls, cfg: Config) -> tuple[SearchDim, ...]:
        """Nothing: joint has no incremental step to tune."""
        return ()


def _unbiased_kd(method: Method, student: SegOutput, teacher: SegOutput) -> dict:
    lc = method.cfg.loss
    if lc.lambda_kd <= 0:
        return {}
    return {"kd": lc.lambda_kd * css.unbiased_kd(student.logits, teacher.logits,
                                                 alpha=lc.kd_alpha)}


@register("mib")
class MiB(Method):
    """MiB (Cermelli et al., CVPR 2020): unbiased CE + lambda_kd * unbiased KD, MiB init."""

    default_seg = "unbiased_ce"
    method_loss_keys = ("loss.lambda_kd", "loss.kd_alpha")
    # MiB: lambda_kd 10 (100 for 15-1, its issue 22)
    search_weights = (SearchDim("loss.lambda_kd", "loguniform", (1.0, 100.0)),)

    def distillation(self, student, teacher, labels):
        """lambda_kd * unbiased KD on the logits (averaged over all pixels)."""
        return _unbiased_kd(self, student, teacher)


@register("plop")
class PLOP(Method):
    """PLOP (Douillard et al., CVPR 2021): CE on entropy-thresholded pseudo-labels weighted
    per image + Local POD on the five taps and the head-resolution logits."""

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


@register("icd")
class ICD(Method):
    """ICD: unbiased CE + unbiased KD + s_t * (internal + external distillation)."""

    default_seg = "unbiased_ce"
    method_loss_keys = ("loss.lambda_kd", "loss.kd_alpha", "loss.icd.")
    # ICD_METHOD.md: lambda_int 1, lambda_ext 10, tau 1, on MiB's lambda_kd 10
    search_weights = (SearchDim("loss.icd.lambda_int", "loguniform", (0.01, 100.0)),
                      SearchDim("loss.icd.lambda_ext", "loguniform", (0.1, 1000.0)),
                      SearchDim("loss.lambda_kd", "loguniform", (1.0, 100.0)),
                      SearchDim("loss.icd.tau", "choice", (0.5, 1.0, 2.0)))

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
            Method.init_student(self, model, state)
            return
        Method.init_student(self, model, state)
        if self.learned_msca:
            self._attach_msca(model)

    def _attach_msca(self, model: nn.Module) -> None:
        msca = MSCA(self.cfg.loss.icd.msca_kernels, learned=True)
        msca.requires_grad_(self.step == 1)
        model.add_module("msca", msca)
        self._learned = (msca,)

    def distillation(self, student, teacher, labels):
        """Unbiased KD and s_t * (lambda_int * L_int + lambda_ext * L_ext)."""
        parts = _unbiased_kd(self, student, teacher)
        factor = self.factor if self.cfg.loss.icd.adaptive_factor else 1.0
        msca = self._learned[0] if self._learned else None
        if self.learned_msca and msca is None:
            raise RuntimeError("loss.icd.msca=learned: init_student() attaches the model's "
                               "MSCA before training")
        for key, value in self.icd(student.features, teacher.features, msca).items():
            parts[key] = factor * value
        return parts


@register("dkd")
class DKD(Method):
    """DKD (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD), as its code computes it: DKD's
    classifier (model.classifier=dkd), its mBCE + AC at step 0 and mBCE + KD + decomposed KD +
    AC at later steps with loss.dkd's weights (losses/dkd.py), new classifiers initialised
    from the auxiliary one, and its recipe: the head and classifiers at head_lr_factor times
    the backbone's lr, weight decay only on the new classifier at t > 0, the backbone's
    BatchNorm momentum 0.01, at t > 0 no dropout and (loss.dkd.freeze_bn) frozen
    normalisation layers."""

    classifier = "dkd"
    method_loss_keys = ("loss.dkd.",)
    # DKD: kd, dkd_pos, dkd_neg 5 (VOC); pos_weight 1 (VOC), 35 (ADE20K). Its mbce and ac
    # weights also shape its own step 0: not searched.
    search_weights = (SearchDim("loss.dkd.kd", "loguniform", (0.5, 50.0)),
                      SearchDim("loss.dkd.dkd_pos", "loguniform", (0.5, 50.0)),
                      SearchDim("loss.dkd.dkd_neg", "loguniform", (0.5, 50.0)),
                      SearchDim("loss.dkd.pos_weight", "loguniform", (0.5, 100.0)))

    @classmethod
    def loss_keys(cls) -> tuple[str, ...]:
        """loss.dkd only: DKD trains with its own mBCE, not loss.seg."""
        return cls.method_loss_keys

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Method's rules, and DKD's own segmentation loss and classifier init."""
        if cfg.loss.seg != "auto":
            raise ConfigError("loss.seg", f"method 'dkd' trains with its own mBCE (loss.dkd."
                              f"mbce); leave loss.seg at auto, got {cfg.loss.seg!r}")
        if cfg.model.mib_init is not None:
            raise ConfigError("model.mib_init", "method 'dkd' initialises new classifiers "
                              "from its auxiliary classifier (random when loss.dkd.ac is 0); "
                              f"leave model.mib_init at null, got {cfg.model.mib_init!r}")
        super().check_config(cfg)

    def __init__(self, cfg: Config, task: Task, step: int):
        if len(task.classes_at(0)) < 2:
            raise ConfigError("task", "DKD needs a class besides background at step 0")
        super().__init__(cfg, task, step)
        self.dkd = cfg.loss.dkd
        # DKD counts the old classes without background and step 0's classes as new
        self.dkd_old = max(self.num_old - 1, 0)
        self.dkd_new = self.num_new if step > 0 else self.num_new - 1

    @property
    def needs_teacher(self) -> bool:
        """Whether this step's loss uses the previous step's model (any step t > 0)."""
        return self.step > 0

    def init_student(self, model: DeepLabV3, state: Mapping[str, torch.Tensor]) -> None:
        """The previous step's weights, a new classifier copying the auxiliary one (random if
        loss.dkd.ac is 0, as DKD's train_voc.py), and at t > 0 with freeze_bn the norm layers'
        weights frozen (DKD's optimiser leaves them out)."""
        model.load_state_dict(dict(state))
        model.classifier.add_step(self.num_new, aux_init=self.dkd.ac > 0)
        if self.dkd.freeze_bn:
            dkd.freeze_norm_layers(model)

    def set_train_mode(self, model: nn.Module) -> None:
        """The backbone's BatchNorm momentum 0.01 (every step); at t > 0 dropout off (DKD's
        freeze_dropout, unconditional) and with freeze_bn the norm layers' statistics frozen."""
        dkd.set_backbone_bn_momentum(model)
        if self.step > 0:
            dkd.dropout_eval(model)
            if self.dkd.freeze_bn:
                dkd.norm_eval(model)

    def param_groups(self, model: nn.Module, params: list[nn.Parameter], lr: float) -> list:
        """DKD's groups (losses/dkd.param_groups)."""
        return dkd.param_groups(model, params, lr, self.cfg.optim.weight_decay,
                                self.dkd.head_lr_factor, self.step)

    @classmethod
    def step0_identity(cls, cfg: Config) -> dict:
        """The loss.dkd keys DKD's step 0 uses: its two weights, the step-0 pos_weight and
        the head's lr factor."""
        d = cfg.loss.dkd
        return {"dkd": {"mbce": d.mbce, "ac": d.ac, "pos_weight_step0": d.pos_weight_step0,
                        "head_lr_factor": d.head_lr_factor}}

    def forward(self, student: SegOutput, teacher: SegOutput | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted terms (their sum is the loss) and the total, detached."""
        if self.step > 0 and teacher is None:
            raise ValueError(f"dkd at step {self.step} needs the teacher's outputs")
        d = self.dkd
        if self.step == 0:
            terms = dkd.dkd_terms(student.logits, None, None, None, None, None, labels, 0,
                                  self.dkd_new, d.pos_weight_step0)
            weights = {"mbce": d.mbce, "ac": d.ac}
        else:
            terms = dkd.dkd_terms(student.logits, teacher.logits, student.pos_reg,
                                  teacher.pos_reg, student.neg_reg, teacher.neg_reg, labels,
                                  self.dkd_old, self.dkd_new, d.pos_weight)
            weights = {k: getattr(d, k) for k in dkd.TERMS}
        parts = {k: w * terms[k] for k, w in weights.items()}
        total = torch.stack(list(parts.values())).sum()
        components = {k: v.detach() for k, v in parts.items()}
        components["total"] = total.detach()
        return total, components


def method_class(cfg: Config) -> type[Method]:
    """The Method class of `cfg.method.name`."""
    try:
        return METHODS[cfg.method.name]
    except KeyError:
        raise ConfigError("method.name", f"unknown method {cfg.method.name!r}; allowed: "
                          f"{', '.join(METHODS)}") from None


def build_method(cfg: Config, task: Task, step: int) -> Method:
    """The method `cfg.method.name` at `step` of `task` (its config checked)."""
    return method_class(cfg)(cfg, task, step)
