"""The protocol's augmentation with the same parameters for image and mask (torch version;
dali_pipeline.py implements the same semantics with DALI operators).

Training: MiB/PLOP's RandomResizedCrop(crop, scale=(0.5, 2.0), ratio=(3/4, 4/3)) (their
dataset/transform.py): up to 10 draws of a box of area s * H * W (s ~ U(scale)) and aspect
w/h log-uniform in `ratio`, sides rounded half to even (Python's round); the first box that
fits in the image is placed uniformly inside it (every top in 0..H-h, every left in 0..W-w);
when none of the 10 fits (often: s may reach 2), their fallback: the central crop of the image
clipped to the extreme aspect ratio. The box always lies inside the image: nothing is padded.
It is resized to crop x crop, then flipped horizontally with probability 0.5; bilinear for the
image, nearest for the mask. `mode="padded"` keeps the previous variant: one draw, placed to
overlap the image as much as it can, a box larger than the image padded (image 0, mask 255).
Randomness comes from the torch.Generator passed in only.
Evaluation: resize the shorter side to `size`, then centre crop size x size.
Both transforms return uint8 images and masks; `normalize` (float32, ImageNet mean/std) is
applied to whole batches by the loader, in the main process, so that workers move uint8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icd_dist.css.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CROP_MODES = ("inside", "padded")
CROP_ATTEMPTS = 10  # MiB/PLOP's RandomResizedCrop draws


@dataclass(frozen=True)
class CropParams:
    """A crop box in source pixels and the flip (mode "inside": the box lies in the image;
    mode "padded": it may extend past the image)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop_params(height: int, width: int, generator: torch.Generator,
                       scale: tuple[float, float] = (0.5, 2.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                       mode: str = "inside") -> CropParams:
    """A random crop box of an image of height x width and the flip.

    mode "inside" (MiB/PLOP's RandomResizedCrop.get_params, see `crop_box_from_uniforms`):
    draws 2 * CROP_ATTEMPTS + 2 float64 uniforms from `generator` (all of them, whether or not
    an early draw fits), then one for the flip. mode "padded" (the previous behaviour): one
    box of area s * H * W, placed so that it overlaps the image as much as it can (inside the
    image when smaller, containing it when larger)."""
    if mode == "padded":
        return _sample_padded(height, width, generator, scale, ratio, hflip)
    if mode != "inside":
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    n = CROP_ATTEMPTS
    u = torch.rand(2 * n + 2, generator=generator, dtype=torch.float64).tolist()
    top, left, h, w = crop_box_from_uniforms(height, width, u[:n], u[n:2 * n], u[2 * n],
                                             u[2 * n + 1], scale, ratio)
    flip = hflip and bool(torch.rand(1, generator=generator).item() < 0.5)
    return CropParams(top, left, h, w, flip)


def crop_box_from_uniforms(height: int, width: int, u_scale: Sequence[float],
                           u_ratio: Sequence[float], u_top: float, u_left: float,
                           scale: tuple[float, float] = (0.5, 2.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3)
                           ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of MiB/PLOP's RandomResizedCrop given its uniforms in [0, 1), in
    float64: for attempt k, target area = (scale0 + (scale1 - scale0) * u_scale[k]) * H * W,
    aspect = exp(log ratio0 + (log ratio1 - log ratio0) * u_ratio[k]), w = round(sqrt(target *
    aspect)), h = round(sqrt(target / aspect)) (half to even); the first with w <= W and h <= H
    gives top = floor(u_top * (H - h + 1)), left = floor(u_left * (W - w + 1)) (uniform
    integers, both ends included). If none fits: w/h = W/H clipped to the ratio range, the
    other side the image's, rounded; centred (floor((H - h) / 2), floor((W - w) / 2)).
    dali_pipeline.py computes the same with DALI operators."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for us, ur in zip(u_scale, u_ratio, strict=True):
        target = (scale[0] + (scale[1] - scale[0]) * us) * area
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if w <= width and h <= height:
            top = min(int(math.floor(u_top * (height - h + 1))), height - h)
            left = min(int(math.floor(u_left * (width - w + 1))), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_padded(height: int, width: int, generator: torch.Generator,
                   scale: tuple[float, float], ratio: tuple[float, float], hflip: bool
                   ) -> CropParams:
    """The "padded" crop: area = s * H * W with s ~ U(scale), aspect w/h log-uniform in
    `ratio`, placed uniformly so that it overlaps the image as much as it can."""
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
                    hflip: bool = True, mode: str = "inside"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (`sample_crop_params`, `mode` "inside" or "padded") + flip,
    identical for image (3, H, W) uint8 and mask (H, W) uint8; returns (uint8 (3, crop, crop),
    uint8 (crop, crop))."""
    H, W = image.shape[-2:]
    p = sample_crop_params(H, W, generator, scale, hflip=hflip, mode=mode)
    if mode == "inside":  # the box lies in the image: a plain slice, never padded
        assert 0 <= p.top <= H - p.height and 0 <= p.left <= W - p.width, p
        img = image[..., p.top:p.top + p.height, p.left:p.left + p.width]
        msk = mask[..., p.top:p.top + p.height, p.left:p.left + p.width]
    else:
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
