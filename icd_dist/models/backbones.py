"""Backbones with four feature taps (strides 4, 8, 16, 16/8 at output stride 16/8).

- ResNet-101 / ResNet-50: torchvision Bottleneck ResNets with `replace_stride_with_dilation`.
- ResNet-18: torchvision's BasicBlock refuses dilation, so its dilated stages are built from
  this module's DilatedBasicBlock (same parameter names, so torchvision weights load).
- MobileNetV3-Large: torchvision's dilated variant; taps at the ends of its stride-4, -8, -16
  stages and its last 1x1 conv (960 channels).

Taps are the stage outputs (`post_activation`) or, as PLOP's network returns them, the last
block's output before its final activation (`pre_activation`: the residual sum before the
ReLU for ResNets; for MobileNetV3 the last 1x1 conv before its hardswish, its stage ends being
linear already). The network computes the same either way; only what is tapped differs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
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


TAP_KINDS = ("post_activation", "pre_activation")


def _residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's or Bottleneck's output before its final ReLU."""
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    identity = block.downsample(x) if block.downsample is not None else x
    return out + identity


class ResNetTaps(nn.Module):
    """A torchvision ResNet that returns layer1..layer4's outputs, or with `pre_activation`
    the residual sums of their last blocks before the ReLU (PLOP's taps)."""

    def __init__(self, resnet: ResNet, taps: str = "post_activation"):
        super().__init__()
        if taps not in TAP_KINDS:
            raise ValueError(f"unknown taps {taps!r}; allowed: {', '.join(TAP_KINDS)}")
        self.pre_activation = taps == "pre_activation"
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four taps of `x` (N, 3, H, W)."""
        return self.taps_and_output(x)[0]

    def taps_and_output(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four taps of `x` and the last stage's output (what the head reads)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        taps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.pre_activation:
                for block in layer[:-1]:
                    x = block(x)
                pre = _residual_sum(layer[-1], x)
                taps.append(pre)
                x = F.relu(pre)  # not in place: the tap keeps its negative values
            else:
                x = layer(x)
                taps.append(x)
        return taps, x


class MobileNetV3Taps(nn.Module):
    """torchvision's dilated MobileNetV3-Large features, tapped at strides 4, 8, 16, 16."""

    # Indices into `features` after which a tap is taken.
    TAP_INDICES = (3, 6, 12, 16)

    def __init__(self, norm: NormFactory, output_stride: int, taps: str = "post_activation"):
        super().__init__()
        if taps not in TAP_KINDS:
            raise ValueError(f"unknown taps {taps!r}; allowed: {', '.join(TAP_KINDS)}")
        self.pre_activation = taps == "pre_activation"
        if output_stride != 16:
            raise ValueError("mobilenet_v3_large supports output_stride 16 only")
        # torchvision's own BatchNorm settings for MobileNetV3; other norms as given.
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01) \
            if norm is nn.BatchNorm2d else norm
        self.features = mobilenet_v3_large(weights=None, dilated=True,
                                           norm_layer=norm_layer).features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four taps of `x` (N, 3, H, W)."""
        return self.taps_and_output(x)[0]

    def taps_and_output(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four taps of `x` and the last layer's output (what the head reads)."""
        taps = []
        last = len(self.features) - 1
        for i, layer in enumerate(self.features):
            if i == last and self.pre_activation:  # Conv2dNormActivation: conv, norm, act
                pre = layer[1](layer[0](x))
                taps.append(pre)
                x = layer[2](pre.clone())  # hardswish may work in place
                continue
            x = layer(x)
            if i in self.TAP_INDICES:
                taps.append(x)
        return taps, x


def build_backbone(name: str, output_stride: int = 16, norm: str = "batchnorm",
                   taps: str = "post_activation") -> nn.Module:
    """A backbone module whose forward returns its four taps (channels: TAP_CHANNELS[name]),
    stage outputs or pre-activations as `taps` says."""
    factory = norm_factory(norm)
    if name == "mobilenet_v3_large":
        return MobileNetV3Taps(factory, output_stride, taps)
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
    return ResNetTaps(net, taps)
