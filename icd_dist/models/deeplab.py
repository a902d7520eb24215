"""DeepLabV3 with feature taps and an incremental classifier.

forward(x) returns SegOutput(logits at the input's size, [layer1, layer2, layer3, layer4,
head], logits at the head's resolution); the head tap is the feature map just before the
classifier. The head is MiB's or DKD's (models/head.py; `head="auto"`: DKD's with DKD's
classifier, MiB's otherwise, as each method's authors train it). `classifier="dkd"` puts
DKD's classifier (models/dkd_classifier.py) on the head: its SegOutput also holds the
positive and negative reasoning maps, and `predict` applies DKD's prediction rule instead of
the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.models.backbones import TAP_CHANNELS, build_backbone, norm_factory
from icd_dist.models.classifier import IncrementalClassifier
from icd_dist.models.dkd_classifier import DKDClassifier
from icd_dist.models.head import HEADS, build_head

# model.classifier -> the classifier module on the head
CLASSIFIERS = {"standard": IncrementalClassifier, "dkd": DKDClassifier}
# model.classifier -> the head its authors train with it (model.head=auto)
AUTO_HEAD = {"standard": "mib", "dkd": "deeplabv3"}


def resolve_head(head: str, classifier: str) -> str:
    """The head a model config means: `head` itself, or for "auto" the one the classifier's
    authors train (DKD's ASPP with DKD's classifier, MiB's head otherwise)."""
    if head == "auto":
        return AUTO_HEAD[classifier]
    if head not in HEADS:
        raise ValueError(f"head must be auto or one of {', '.join(HEADS)}, got {head!r}")
    return head


@dataclass
class SegOutput:
    """Logits (N, classes, H, W) at the input size, the five feature taps, and the logits at
    the head's resolution before upsampling (PLOP distils those; None where not produced);
    with DKD's classifier, its positive and negative reasoning maps at the head's resolution
    (N, classes - 1, h, w; None for the other classifiers)."""

    logits: torch.Tensor
    features: list[torch.Tensor]
    head_logits: torch.Tensor | None = None
    pos_reg: torch.Tensor | None = None
    neg_reg: torch.Tensor | None = None


class DeepLabV3(nn.Module):
    """Backbone (4 taps) -> DeepLabV3 head (5th tap) -> incremental classifier."""

    def __init__(self, backbone: str, classes_per_step: Sequence[int], output_stride: int = 16,
                 head_channels: int = 256, norm: str = "batchnorm",
                 taps: str = "post_activation", classifier: str = "standard",
                 head: str = "auto"):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got "
                             f"{classifier!r}")
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, output_stride, norm, taps)
        self.head_kind = resolve_head(head, classifier)
        self.head = build_head(self.head_kind, TAP_CHANNELS[backbone][-1], head_channels,
                               output_stride, norm_factory(norm))
        self.classifier = CLASSIFIERS[classifier](head_channels, classes_per_step)

    @property
    def num_classes(self) -> int:
        """Number of logits (classes seen so far)."""
        return self.classifier.num_classes

    def add_step(self, num_new_classes: int, mib_init: bool = True) -> None:
        """Extend the classifier for a new step (MiB's initialisation by default)."""
        self.classifier.add_step(num_new_classes, mib_init)

    def forward(self, x: torch.Tensor, upsample: bool = True) -> SegOutput:
        """Logits (upsampled bilinearly to x's size unless `upsample` is False) and taps."""
        taps, out = self.backbone.taps_and_output(x)
        head = self.head(out)
        small = self.classifier(head)
        logits = small
        if upsample:
            logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)
        pos = neg = None
        if isinstance(self.classifier, DKDClassifier):
            pos, neg = self.classifier.reasoning(head)
        return SegOutput(logits, [*taps, head], small, pos, neg)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Labels (N, H, W) from this model's logits: the argmax, or DKD's rule with its
        classifier."""
        return self.classifier.predict(logits)


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm replaced by SyncBatchNorm (for data-parallel training on
    GPUs, where per-GPU batches are small); GroupNorm models are returned unchanged."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_model(model_cfg, classes_per_step: Sequence[int],
                load_pretrained: bool = True) -> DeepLabV3:
    """A DeepLabV3 from a ModelConfig, with a classifier head per entry of classes_per_step;
    loads model_cfg.pretrained into the backbone when it names a file (not null or "none")
    and `load_pretrained` (models about to receive saved weights skip it)."""
    from icd_dist.models.pretrained import load_pretrained_backbone, pretrained_file

    model = DeepLabV3(model_cfg.backbone, classes_per_step, model_cfg.output_stride,
                      model_cfg.head_channels, model_cfg.norm, model_cfg.taps,
                      model_cfg.classifier, model_cfg.head)
    weights = pretrained_file(model_cfg.pretrained)  # None for null and "none"
    if load_pretrained and weights:
        load_pretrained_backbone(model.backbone, weights, model_cfg.backbone)
    return model
