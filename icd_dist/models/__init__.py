"""Segmentation models: DeepLabV3 on ResNet-101/50/18 or MobileNetV3-Large, with feature taps
and an incremental classifier."""

from icd_dist.models.deeplab import DeepLabV3, SegOutput, build_model, to_sync_batchnorm
from icd_dist.models.pretrained import PretrainedFormatError, load_pretrained_backbone
from icd_dist.models.teacher import freeze, make_teacher

__all__ = ["DeepLabV3", "PretrainedFormatError", "SegOutput", "build_model", "freeze",
           "load_pretrained_backbone", "make_teacher", "to_sync_batchnorm"]
