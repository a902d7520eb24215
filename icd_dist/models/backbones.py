"""Backbones with four feature taps (strides 4, 8, 16, 16/8 at output stride 16/8).

- ResNet-101 / ResNet-50: torchvision Bottleneck ResNets with `replace_stride_with_dilation`.
- ResNet-18: torchvision's BasicBlock refuses dilation, so its dilated stages are built from
  this module's DilatedBasicBlock (same parameter names, so torchvision weights load).
- MobileNetV3-Large: torchvision's dilated variant; taps at the ends of its stride-4, -8, -16
  stages and its last 1x1 conv (960 channels).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50, resnet101
from torchvision.models.resnet import BasicBlock, ResNet

NormFactory = Callable[[int], nn.Module]

# Channels of the four backbone taps.
TAP_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet101": (256, 512, 1024, 2048),
    "resnet50": (256, 512, 1024, 2048),
    "resnet18": (64, 128, 256, 512),
    "mobilenet_v3_large": (24, 40, 112, 960),
}


def norm_factory(kind: str, groups: int = 32) -> NormFactory:
    """A constructor of normalisation layers: BatchNorm2d, or GroupNorm with up to `groups`
    groups of at least two channels each (so it also normalises 1x1 maps, as ASPP's pooling
    branch makes)."""
    if kind == "batchnorm":
        return nn.BatchNorm2d
    if kind == "groupnorm":
        def group_norm(channels: int) -> nn.Module:
            limit = max(1, min(groups, channels // 2))
            g = max(d for d in range(1, limit + 1) if channels % d == 0)
            return nn.GroupNorm(g, channels)
        return group_norm
    raise ValueError(f"unknown norm {kind!r}; allowed: batchnorm, groupnorm")


def _dilation_flags(output_stride: int) -> list[bool]:
    if output_stride == 16:
        return [False, False, True]
    if output_stride == 8:
        return [False, True, True]
    raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")


class DilatedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with its 3x3 convolutions dilated (padding = dilation)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormFactory | None = None):
        super().__init__(inplanes, planes, stride, downsample, 1, 64, 1, norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("DilatedBasicBlock supports only groups=1, base_width=64")
        for conv in (self.conv1, self.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


class ResNetTaps(nn.Module):
    """A torchvision ResNet that returns the outputs of layer1..layer4."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four taps of `x` (N, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


class MobileNetV3Taps(nn.Module):
    """torchvision's dilated MobileNetV3-Large features, tapped at strides 4, 8, 16, 16."""

    # Indices into `features` after which a tap is taken.
    TAP_INDICES = (3, 6, 12, 16)

    def __init__(self, norm: NormFactory, output_stride: int):
        super().__init__()
        if output_stride != 16:
            raise ValueError("mobilenet_v3_large supports output_stride 16 only")
        # torchvision's own BatchNorm settings for MobileNetV3; other norms as given.
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01) \
            if norm is nn.BatchNorm2d else norm
        self.features = mobilenet_v3_large(weights=None, dilated=True,
                                           norm_layer=norm_layer).features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four taps of `x` (N, 3, H, W)."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAP_INDICES:
                taps.append(x)
        return taps


def build_backbone(name: str, output_stride: int = 16, norm: str = "batchnorm") -> nn.Module:
    """A backbone module whose forward returns its four taps (channels: TAP_CHANNELS[name])."""
    factory = norm_factory(norm)
    if name == "mobilenet_v3_large":
        return MobileNetV3Taps(factory, output_stride)
    flags = _dilation_flags(output_stride)
    if name == "resnet101":
        net = resnet101(weights=None, replace_stride_with_dilation=flags, norm_layer=factory)
    elif name == "resnet50":
        net = resnet50(weights=None, replace_stride_with_dilation=flags, norm_layer=factory)
    elif name == "resnet18":
        net = ResNet(DilatedBasicBlock, [2, 2, 2, 2], replace_stride_with_dilation=flags,
                     norm_layer=factory)
    else:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(TAP_CHANNELS)}")
    return ResNetTaps(net)
