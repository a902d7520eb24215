"""DKD's classifier (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD models/model.py): sigmoid
outputs, one 1x1 conv per step plus an auxiliary one-channel classifier, and the positive and
negative reasoning maps that DKD distils.

Logit layout, the same as our other classifiers' so that labels, teacher sharing and metrics
need nothing new: channel 0 is the auxiliary classifier (DKD's `cls[0]`; it stands where
background stands), channel c >= 1 is class c. The auxiliary classifier reads the head's
features detached (`forward_class_prediction`), so only its own weights learn from it.

- positive / negative reasoning maps (`forward_class_prediction_positive` / `_negative`): every
  class classifier except the auxiliary one applied with only its positive (only its negative)
  weights and no bias, at the head's resolution;
- initialisation (`_init_classifier`): kaiming-normal weights, the layer's default bias; a new
  step's classifier copies the auxiliary classifier's weights and bias into every new class
  (`init_novel_classifier`), or keeps its random init when DKD's AC weight is 0;
- prediction (Trainer_base._test): sigmoid, the most probable class among channels 1..C-1,
  background (0) where no class has a probability above 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.kaiming_normal_(conv.weight)  # DKD's _init_classifier; the bias keeps torch's init
    return conv


def dkd_predict(logits: torch.Tensor) -> torch.Tensor:
    """DKD's prediction rule: (N, C, H, W) logits (channel 0 auxiliary) -> (N, H, W) labels.
    The class of the highest sigmoid among channels 1..C-1 (the first on ties), and 0 where
    none of them exceeds 0.5."""
    probs = torch.sigmoid(logits[:, 1:].float())
    pred = probs.argmax(dim=1) + 1
    return pred.masked_fill(~(probs > 0.5).any(dim=1), 0)


class DKDClassifier(nn.Module):
    """DKD's classifier over `classes_per_step` (step 0's count includes background, whose
    channel is the auxiliary classifier)."""

    def __init__(self, in_channels: int, classes_per_step: Sequence[int]):
        super().__init__()
        if not classes_per_step or any(n <= 0 for n in classes_per_step):
            raise ValueError(f"classes_per_step must be positive counts, got {classes_per_step}")
        if classes_per_step[0] < 2:
            raise ValueError("DKD's classifier needs a class besides background at step 0, got "
                             f"classes_per_step {list(classes_per_step)}")
        self.in_channels = in_channels
        self.aux = _kaiming_conv(in_channels, 1)
        sizes = [classes_per_step[0] - 1, *classes_per_step[1:]]
        self.heads = nn.ModuleList(_kaiming_conv(in_channels, n) for n in sizes)

    @property
    def classes_per_step(self) -> list[int]:
        """Number of logits of each step (step 0 with the auxiliary channel)."""
        sizes = [h.out_channels for h in self.heads]
        return [sizes[0] + 1, *sizes[1:]]

    @property
    def num_classes(self) -> int:
        """Total number of logits (the auxiliary channel included)."""
        return sum(self.classes_per_step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, h, w): the auxiliary classifier on detached features, then
        every step's classes."""
        return torch.cat([self.aux(x.detach()), *(head(x) for head in self.heads)], dim=1)

    def reasoning(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) reasoning maps (N, num_classes - 1, h, w): every class
        classifier with only its positive (negative) weights, no bias, no auxiliary channel."""
        weight = torch.cat([h.weight for h in self.heads], dim=0)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        pos = F.conv2d(x, torch.where(weight > 0, weight, zero))
        neg = F.conv2d(x, torch.where(weight < 0, weight, zero))
        return pos, neg

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        """Labels from logits by DKD's rule (dkd_predict)."""
        return dkd_predict(logits)

    @torch.no_grad()
    def add_step(self, num_new_classes: int, aux_init: bool = True) -> None:
        """Append a classifier for `num_new_classes` classes: every new class copies the
        auxiliary classifier's weight and bias (DKD's init_novel_classifier), or, with
        aux_init=False, a random init (kaiming-normal weights, as DKD without its AC loss)."""
        if num_new_classes <= 0:
            raise ValueError(f"num_new_classes must be positive, got {num_new_classes}")
        head = _kaiming_conv(self.in_channels, num_new_classes).to(self.aux.weight.device,
                                                                   self.aux.weight.dtype)
        if aux_init:
            head.weight.copy_(self.aux.weight.expand_as(head.weight))
            head.bias.copy_(self.aux.bias.expand_as(head.bias))
        self.heads.append(head)
