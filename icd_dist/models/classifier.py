"""The incremental classifier: one 1x1 conv per step, logits concatenated in step order."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class IncrementalClassifier(nn.Module):
    """1x1 convolutions, one per step; the logits of step t's classes follow those of t-1."""

    def __init__(self, in_channels: int, classes_per_step: Sequence[int]):
        super().__init__()
        if not classes_per_step or any(n <= 0 for n in classes_per_step):
            raise ValueError(f"classes_per_step must be positive counts, got {classes_per_step}")
        self.in_channels = in_channels
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, n, 1) for n in classes_per_step)

    @property
    def classes_per_step(self) -> list[int]:
        """Number of classes of each step's head."""
        return [h.out_channels for h in self.heads]

    @property
    def num_classes(self) -> int:
        """Total number of logits."""
        return sum(self.classes_per_step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, h, w)."""
        return torch.cat([head(x) for head in self.heads], dim=1)

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        """Labels (N, H, W): the argmax over the classes."""
        return logits.argmax(dim=1)

    @torch.no_grad()
    def add_step(self, num_new_classes: int, mib_init: bool = True) -> None:
        """Append a head for `num_new_classes` new classes.

        With MiB's initialisation the new classes copy the background weights and the
        background bias b becomes b - log(n + 1) for background and every new class, so that
        p_new(background) + sum p_new(new classes) = p_old(background) for every input."""
        if num_new_classes <= 0:
            raise ValueError(f"num_new_classes must be positive, got {num_new_classes}")
        ref = self.heads[0]
        head = nn.Conv2d(self.in_channels, num_new_classes, 1).to(ref.weight.device,
                                                                 ref.weight.dtype)
        if mib_init:
            bg_weight = ref.weight[0]
            new_bias = ref.bias[0] - math.log(num_new_classes + 1)
            head.weight.copy_(bg_weight.expand_as(head.weight))
            head.bias.fill_(float(new_bias))
            ref.bias[0] = new_bias
        self.heads.append(head)
