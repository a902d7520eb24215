"""dkd: DKD (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD): mbce * L_mBCE + kd * L_KD +
dkd_pos * L_pos + dkd_neg * L_neg + ac * L_AC on DKD's sigmoid classifier (losses/dkd.py);
its step 0 trains mbce * L_mBCE + ac * L_AC, so DKD has its own step-0 model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from icd_dist.config import Config, ConfigError, SearchDim
from icd_dist.css.tasks import Task
from icd_dist.losses import dkd as dkd_loss
from icd_dist.methods.base import Method
from icd_dist.models.deeplab import DeepLabV3, SegOutput


class DKD(Method):
    """DKD (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD), as its code computes it: DKD's
    classifier (model.classifier=dkd), its mBCE + AC at step 0 and mBCE + KD + decomposed KD +
    AC at later steps with loss.dkd's weights (losses/dkd.py), new classifiers initialised
    from the auxiliary one, and its recipe: the head and classifiers at head_lr_factor times
    the backbone's lr, weight decay only on the new classifier at t > 0, the backbone's
    BatchNorm momentum 0.01, at t > 0 no dropout and (loss.dkd.freeze_bn) frozen
    normalisation layers."""

    name = "dkd"
    classifier = "dkd"
    trains_own_step0 = True
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
            dkd_loss.freeze_norm_layers(model)

    def set_train_mode(self, model: nn.Module) -> None:
        """The backbone's BatchNorm momentum 0.01 (every step); at t > 0 dropout off (DKD's
        freeze_dropout, unconditional) and with freeze_bn the norm layers' statistics frozen."""
        dkd_loss.set_backbone_bn_momentum(model)
        if self.step > 0:
            dkd_loss.dropout_eval(model)
            if self.dkd.freeze_bn:
                dkd_loss.norm_eval(model)

    def param_groups(self, model: nn.Module, params: list[nn.Parameter], lr: float) -> list:
        """DKD's groups (losses/dkd.param_groups)."""
        return dkd_loss.param_groups(model, params, lr, self.cfg.optim.weight_decay,
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
            terms = dkd_loss.dkd_terms(student.logits, None, None, None, None, None, labels, 0,
                                  self.dkd_new, d.pos_weight_step0)
            weights = {"mbce": d.mbce, "ac": d.ac}
        else:
            terms = dkd_loss.dkd_terms(student.logits, teacher.logits, student.pos_reg,
                                  teacher.pos_reg, student.neg_reg, teacher.neg_reg, labels,
                                  self.dkd_old, self.dkd_new, d.pos_weight)
            weights = {k: getattr(d, k) for k in dkd_loss.TERMS}
        parts = {k: w * terms[k] for k, w in weights.items()}
        total = torch.stack(list(parts.values())).sum()
        components = {k: v.detach() for k, v in parts.items()}
        components["total"] = total.detach()
        return total, components
