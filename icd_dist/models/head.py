"""DeepLabV3's head: ASPP (rates 6/12/18 at output stride 16, doubled at 8) + image pooling,
projected to `channels`, then a 3x3 conv; its output is the fifth feature tap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.models.backbones import NormFactory


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The ASPP dilation rates for an output stride (DeepLabV3)."""
    if output_stride == 16:
        return (6, 12, 18)
    if output_stride == 8:
        return (12, 24, 36)
    raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")


def _conv_norm_relu(cin: int, cout: int, k: int, norm: NormFactory, dilation: int = 1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        norm(cout), nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's global branch: average pool, 1x1 conv, norm, ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int, norm: NormFactory):
        super().__init__()
        # GroupNorm on a 1x1 map is fine; BatchNorm needs batch > 1 in training (as torchvision).
        self.proj = _conv_norm_relu(cin, cout, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features broadcast to x's spatial size."""
        pooled = self.proj(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class DeepLabV3Head(nn.Module):
    """ASPP + projection + 3x3 conv: (N, in_channels, h, w) -> (N, channels, h, w)."""

    def __init__(self, in_channels: int, channels: int, output_stride: int, norm: NormFactory,
                 dropout: float = 0.1):
        super().__init__()
        branches = [_conv_norm_relu(in_channels, channels, 1, norm)]
        branches += [_conv_norm_relu(in_channels, channels, 3, norm, dilation=r)
                     for r in aspp_rates(output_stride)]
        branches.append(ImagePooling(in_channels, channels, norm))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_norm_relu(5 * channels, channels, 1, norm),
                                     nn.Dropout(dropout))
        self.conv = _conv_norm_relu(channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's features (the fifth tap)."""
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.conv(self.project(x))
