"""The protocol's augmentation with the same parameters for image and mask (torch version;
dali_pipeline.py implements the same semantics with DALI operators).

Training: RandomResizedCrop(crop, scale, ratio) where scale is the crop box's area relative
to the image's (0.5-2.0: a box larger than the image is allowed and padded: image with 0,
mask with 255), then a horizontal flip with probability 0.5; bilinear for the image, nearest
for the mask. Evaluation: resize the shorter side to `size`, then centre crop size x size.
Both transforms return uint8 images and masks; `normalize` (float32, ImageNet mean/std) is
applied to whole batches by the loader, in the main process, so that workers move uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


@dataclass(frozen=True)
class CropParams:
    """A crop box in source pixels (may extend past the image) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop_params(height: int, width: int, generator: torch.Generator,
                       scale: tuple[float, float] = (0.5, 2.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True
                       ) -> CropParams:
    """Random crop box: area = s * H * W with s ~ U(scale), aspect w/h log-uniform in `ratio`,
    placed uniformly so that it overlaps the image as much as it can (inside the image when
    smaller, containing it when larger)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = math.exp(log_r)
    w = max(1, round(math.sqrt(area * aspect)))
    h = max(1, round(math.sqrt(area / aspect)))
    top = _place(height, h, u[2])
    left = _place(width, w, u[3])
    flip = hflip and bool(torch.rand(1, generator=generator).item() < 0.5)
    return CropParams(top, left, h, w, flip)


def _place(size: int, box: int, u: float) -> int:
    lo, hi = min(0, size - box), max(0, size - box)
    return lo + int(math.floor(u * (hi - lo + 1))) if hi > lo else lo


def crop_padded(x: torch.Tensor, top: int, left: int, height: int, width: int,
                fill: float) -> torch.Tensor:
    """Crop (..., H, W) to the box, filling the part of the box outside x with `fill`."""
    H, W = x.shape[-2:]
    out = torch.full((*x.shape[:-2], height, width), fill, dtype=x.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, H), min(left + width, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = x[..., y0:y1, x0:x1]
    return out


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) image, antialiased when shrinking; uint8 stays uint8
    (torch's vectorised uint8 path, the fast one on CPU)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a uint8 (H, W) mask (never invents ids)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None], size=size, mode="nearest-exact")[0, 0]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with the ImageNet mean/std (on the images'
    device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255
    return (images.float() - mean) / std


def train_transform(image: torch.Tensor, mask: torch.Tensor, crop: int,
                    generator: torch.Generator, scale: tuple[float, float] = (0.5, 2.0),
                    hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop + flip, identical for image (3, H, W) uint8 and mask (H, W) uint8;
    returns (uint8 (3, crop, crop), uint8 (crop, crop))."""
    p = sample_crop_params(image.shape[-2], image.shape[-1], generator, scale, hflip=hflip)
    img = crop_padded(image, p.top, p.left, p.height, p.width, 0)
    msk = crop_padded(mask, p.top, p.left, p.height, p.width, IGNORE_INDEX)
    img = resize_image(img, (crop, crop))
    msk = resize_mask(msk, (crop, crop))
    if p.flip:
        img, msk = img.flip(-1), msk.flip(-1)
    return img, msk


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, the other side rounded half up."""
    if height <= width:
        return size, max(1, math.floor(width * size / height + 0.5))
    return max(1, math.floor(height * size / width + 0.5)), size


def eval_transform(image: torch.Tensor, mask: torch.Tensor, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the shorter side to `size` (image bilinear, mask nearest), centre crop
    size x size; returns (uint8 (3, size, size), uint8 (size, size))."""
    new = resized_shorter_side(image.shape[-2], image.shape[-1], size)
    img = resize_image(image, new)
    msk = resize_mask(mask, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    img = crop_padded(img, top, left, size, size, 0)
    msk = crop_padded(msk, top, left, size, size, IGNORE_INDEX)
    return img, msk
