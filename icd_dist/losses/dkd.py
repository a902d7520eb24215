"""DKD (Decomposed Knowledge Distillation, Baek et al., NeurIPS 2022), as its authors' code
computes it (cvlab-yonsei/DKD: models/loss.py, trainer/trainer_voc.py and trainer_ade.py,
train_voc.py and train_ade.py, models/model.py).

Every term is a sigmoid binary cross-entropy l(x, t) = -(w t log s(x) + (1 - t) log(1 - s(x)))
(s the sigmoid, w the positive weight, 1 except in the mBCE), averaged per class over N, H, W,
then summed over the classes: that sum is what enters DKD's weighted total
(`loss_x.mean(dim=[0, 2, 3])`, then `.sum()`). Logits hold the auxiliary classifier at channel
0 and class c at channel c; with o old classes (background not counted) and n new ones:

- mbce: new classes o+1..o+n against their one-hot labels, w = pos_weight (WBCELoss). Every
  other pixel, background, ignored (255) and any other label, is a negative for every new
  class and counts in the mean, as WBCELoss builds its target.
- kd: old classes 1..o against the teacher's sigmoids s(x_old) (KDLoss).
- dkd_pos / dkd_neg: the student's positive / negative reasoning maps of the old classes
  against the teacher's sigmoids of its own maps (KDLoss), at the head's resolution.
- ac: the auxiliary channel against 0 at every pixel (ACLoss).

Step 0 (Trainer_base) trains mbce (o = 0, every class of step 0 new) and ac.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.losses.precision import upcast

TERMS = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac")


def _per_class_bce_sum(logits: torch.Tensor, target: torch.Tensor,
                       pos_weight: float | None = None) -> torch.Tensor:
    """Sigmoid BCE of (N, C, H, W) logits against targets, averaged over N, H, W per class,
    summed over the classes (0 for C = 0)."""
    weight = None
    if pos_weight is not None:
        weight = torch.full((logits.shape[1], 1, 1), float(pos_weight), dtype=logits.dtype,
                            device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight,
                                              reduction="none")
    return loss.mean(dim=(0, 2, 3)).sum()


def _kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DKD's KDLoss on (N, C, H, W) maps: BCE of the student's logits against the teacher's
    sigmoids, per-class mean, summed."""
    student = upcast(student)
    return _per_class_bce_sum(student, torch.sigmoid(upcast(teacher.detach())).to(student.dtype))


def dkd_terms(logits: torch.Tensor, logits_old: torch.Tensor | None,
              pos_reg: torch.Tensor | None, pos_reg_old: torch.Tensor | None,
              neg_reg: torch.Tensor | None, neg_reg_old: torch.Tensor | None,
              labels: torch.Tensor, num_old_classes: int, num_new_classes: int,
              pos_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """DKD's five terms, unweighted, each reduced as its trainer reduces it (see the module
    docstring): {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}, scalars in float32 (float64 in).

    logits (N, 1 + o + n, H, W) with the auxiliary channel at 0; logits_old (N, 1 + o, H, W);
    pos_reg / neg_reg (N, o + n, h, w) and their teacher's (N, o, h, w); labels (N, H, W) with
    the new classes' ids o+1..o+n. num_old_classes = o counts the classes before this step
    without background. The teacher's tensors may be None at step 0 (o = 0): kd, dkd_pos and
    dkd_neg are then 0, the sum over no class."""
    o, n = int(num_old_classes), int(num_new_classes)
    if o < 0 or n <= 0:
        raise ValueError(f"need num_old_classes >= 0 and num_new_classes > 0, got {o}, {n}")
    if logits.shape[1] != 1 + o + n:
        raise ValueError(f"logits have {logits.shape[1]} channels; expected 1 (auxiliary) + "
                         f"{o} old + {n} new")
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    x = upcast(logits)
    new_ids = torch.arange(o + 1, o + n + 1, device=labels.device).view(1, n, 1, 1)
    target = (labels.unsqueeze(1) == new_ids).to(x.dtype)
    terms = {"mbce": _per_class_bce_sum(x[:, o + 1:], target, pos_weight)}
    zero = x.new_zeros(())
    teacher = (logits_old, pos_reg, pos_reg_old, neg_reg, neg_reg_old)
    if o == 0 and all(t is None for t in teacher):
        terms.update(kd=zero, dkd_pos=zero, dkd_neg=zero)
    else:
        if any(t is None for t in teacher):
            raise ValueError("kd, dkd_pos and dkd_neg need the teacher's logits and both "
                             "reasoning maps of student and teacher")
        if logits_old.shape[1] != 1 + o:
            raise ValueError(f"logits_old have {logits_old.shape[1]} channels; expected 1 "
                             f"(auxiliary) + {o} old")
        for name, ours, old in (("pos_reg", pos_reg, pos_reg_old),
                                ("neg_reg", neg_reg, neg_reg_old)):
            if ours.shape[1] != o + n or old.shape[1] != o:
                raise ValueError(f"{name} has {ours.shape[1]} channels and the teacher's "
                                 f"{old.shape[1]}; expected {o + n} and {o}")
        terms["kd"] = _kd(x[:, 1:o + 1], logits_old[:, 1:])
        terms["dkd_pos"] = _kd(pos_reg[:, :o], pos_reg_old)
        terms["dkd_neg"] = _kd(neg_reg[:, :o], neg_reg_old)
    terms["ac"] = _per_class_bce_sum(x[:, :1], torch.zeros_like(x[:, :1]))
    return {k: terms[k] for k in TERMS}


# Normalisation layers whose statistics and affine weights DKD freezes at steps t > 0.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
# DKD sets the backbone's BatchNorm momentum to 0.01 (train_voc.py: _set_bn_momentum).
BACKBONE_BN_MOMENTUM = 0.01


def freeze_norm_layers(model: nn.Module) -> None:
    """Steps t > 0 (DKD's freeze_bn with --freeze_bn, and its optimiser, which leaves the
    norm layers' weights out): every normalisation layer's affine weights stop learning."""
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def norm_eval(model: nn.Module) -> None:
    """Steps t > 0 with freeze_bn, after model.train(): the normalisation layers use and keep
    their running statistics (eval mode), as DKD's freeze_bn."""
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            m.eval()


def dropout_eval(model: nn.Module) -> None:
    """Steps t > 0, after model.train(): dropout off. DKD's trainer calls freeze_dropout() at
    every step t > 0, whatever --freeze_bn says."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def set_backbone_bn_momentum(model: nn.Module, momentum: float = BACKBONE_BN_MOMENTUM) -> None:
    """The backbone's BatchNorm momentum, as DKD sets it at every step."""
    for m in model.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def param_groups(model: nn.Module, params, lr: float, weight_decay: float,
                 head_lr_factor: float, step: int) -> list[dict]:
    """DKD's optimiser groups (train_voc.py) over `params` (the trainable ones): the backbone
    at lr, the head (ASPP) and the classifiers at lr * head_lr_factor; at step 0 every group
    with weight decay, at steps t > 0 only the new classifier (the others at 0). Parameters of
    `params` outside these modules (none for DKD) keep lr and weight decay."""
    wanted = {id(p) for p in params}
    new_head = f"classifier.heads.{len(model.classifier.heads) - 1}." if step > 0 else None
    decay_old = weight_decay if step == 0 else 0.0
    groups = {"backbone": ([], lr, decay_old), "head": ([], lr * head_lr_factor, decay_old),
              "classifier": ([], lr * head_lr_factor, decay_old),
              "new classifier": ([], lr * head_lr_factor, weight_decay),
              "other": ([], lr, weight_decay)}
    placed = set()
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        if new_head and name.startswith(new_head):
            key = "new classifier"
        else:
            key = next((k for k in ("backbone", "head", "classifier")
                        if name.startswith(k + ".")), "other")
        groups[key][0].append(p)
        placed.add(id(p))
    groups["other"][0].extend(p for p in params if id(p) not in placed)
    return [{"params": ps, "lr": group_lr, "weight_decay": wd, "name": key}
            for key, (ps, group_lr, wd) in groups.items() if ps]
