"""The frozen teacher: the model of the previous step, in eval mode, without gradients."""

from __future__ import annotations

import copy

import torch
from torch import nn


def freeze(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put `model` in eval mode, turn off its gradients and optionally cast it (in place);
    returns it. A frozen model stays in eval mode even when .train() is called on it."""
    model.eval()
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    model.train = _stay_in_eval.__get__(model)  # type: ignore[method-assign]
    return model


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


def make_teacher(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen deep copy of `model` (eval mode, no grad, optional bf16/fp16 cast)."""
    return freeze(copy.deepcopy(model), dtype)
