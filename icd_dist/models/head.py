"""The two DeepLabV3 heads the baselines' authors train; the head's output is the fifth tap.

- `mib`: MiB's head (MiB modules/deeplab.py, identical in PLOP), which ft, joint, MiB, PLOP and
  ICD train: four ASPP convolutions (1x1 and three dilated 3x3) concatenated, one norm +
  activation over the concatenation, a 1x1 reduction; the image-pooling branch (global mean,
  1x1 conv, norm + activation) reduced by its own 1x1 conv and ADDED to the reduction; a final
  norm + activation. No dropout, no 3x3 conv after the ASPP. Its activation is MiB's in-place
  ABN's leaky ReLU (slope 0.01); its convolutions are initialised `xavier_normal_` with that
  activation's gain. Rates 6/12/18 at output stride 16, 12/24/32 at 8 (MiB's code).
- `deeplabv3`: DKD's ASPP (DKD models/modules/aspp.py, `bn_sync`; torchvision's structure):
  five branches (1x1, three dilated 3x3, image pooling) each with norm + ReLU, concatenated,
  projected by a 1x1 conv + norm + ReLU, dropout 0.1, then a 3x3 conv + norm + ReLU;
  convolutions initialised `kaiming_normal_`. Rates 6/12/18 at output stride 16, 12/24/36 at 8.

Norm layers are the model's (BatchNorm or GroupNorm), their weights 1 and biases 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icd_dist.models.backbones import NormFactory

# The ASPP's three dilation rates per head and output stride, as each author's code has them.
ASPP_RATES = {
    "mib": {16: (6, 12, 18), 8: (12, 24, 32)},
    "deeplabv3": {16: (6, 12, 18), 8: (12, 24, 36)},
}
# MiB's in-place ABN: leaky ReLU with this slope, also the gain of its xavier init.
MIB_LEAKY_SLOPE = 0.01


def aspp_rates(output_stride: int, head: str = "deeplabv3") -> tuple[int, int, int]:
    """The ASPP dilation rates of `head` at `output_stride`."""
    if head not in ASPP_RATES:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(ASPP_RATES)}")
    try:
        return ASPP_RATES[head][output_stride]
    except KeyError:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}") from None


def _reset_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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
    """DKD's ASPP (module docstring): (N, in_channels, h, w) -> (N, channels, h, w)."""

    def __init__(self, in_channels: int, channels: int, output_stride: int, norm: NormFactory,
                 dropout: float = 0.1):
        super().__init__()
        branches = [_conv_norm_relu(in_channels, channels, 1, norm)]
        branches += [_conv_norm_relu(in_channels, channels, 3, norm, dilation=r)
                     for r in aspp_rates(output_stride, "deeplabv3")]
        branches.append(ImagePooling(in_channels, channels, norm))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_norm_relu(5 * channels, channels, 1, norm),
                                     nn.Dropout(dropout))
        self.conv = _conv_norm_relu(channels, channels, 3, norm)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # DKD's _init_weight (bn_sync)
        _reset_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's features (the fifth tap)."""
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.conv(self.project(x))


class _NormLeaky(nn.Sequential):
    """A norm layer followed by MiB's leaky ReLU (what its in-place ABN computes)."""

    def __init__(self, channels: int, norm: NormFactory):
        super().__init__(norm(channels), nn.LeakyReLU(MIB_LEAKY_SLOPE, inplace=True))


class MiBHead(nn.Module):
    """MiB's DeepLabV3 head (module docstring): (N, in_channels, h, w) -> (N, channels, h, w)
    with `hidden` channels per ASPP branch (MiB: 256, the same as its output)."""

    def __init__(self, in_channels: int, channels: int, output_stride: int, norm: NormFactory,
                 hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        r = aspp_rates(output_stride, "mib")
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden, 3, padding=d, dilation=d, bias=False) for d in r])
        self.map_bn = _NormLeaky(4 * hidden, norm)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.global_pooling_bn = _NormLeaky(hidden, norm)
        self.red_conv = nn.Conv2d(4 * hidden, channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, channels, 1, bias=False)
        self.red_bn = _NormLeaky(channels, norm)
        gain = nn.init.calculate_gain("leaky_relu", MIB_LEAKY_SLOPE)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)
        _reset_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's features (the fifth tap)."""
        out = self.red_conv(self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1)))
        # MiB pools globally in training and, with its --pooling 32 default, over a 32x32
        # window at test time: the same as the global mean wherever the map is at most 32x32
        # (a 512 crop at output stride 16); this head always pools globally.
        pool = self.global_pooling_bn(self.global_pooling_conv(x.mean(dim=(2, 3), keepdim=True)))
        out = out + self.pool_red_conv(pool)  # broadcast = MiB's repeat over (h, w)
        return self.red_bn(out)


# model.head -> the head module
HEADS = {"mib": MiBHead, "deeplabv3": DeepLabV3Head}


def build_head(kind: str, in_channels: int, channels: int, output_stride: int,
               norm: NormFactory) -> nn.Module:
    """The head `kind` (HEADS) from `in_channels` backbone channels to `channels`."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEADS)}")
    return HEADS[kind](in_channels, channels, output_stride, norm)
