"""A learnable synthetic segmentation dataset: textured shapes of K classes on a textured
background, written in the same shard format as real data (for the demo and the tests).

Class c has its own colour and stripe frequency; each image holds 1-4 shapes (rectangles,
ellipses, triangles) of random classes, sizes and places on a noisy background. The mask is
exactly the painted shapes, so it is computable from the image and a small model learns it.
"""

from __future__ import annotations

import colorsys
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from icd_dist.css.classes import generic_spec
from icd_dist.data.manifest import Manifest
from icd_dist.data.readers import RawSample
from icd_dist.data.shard_writer import build_shards


def class_colour(c: int, num_classes: int) -> np.ndarray:
    """The RGB colour (0-255) of class c >= 1: hues spread around the circle."""
    r, g, b = colorsys.hsv_to_rgb((c - 1) / max(1, num_classes - 1), 0.85, 0.95)
    return np.array([r, g, b]) * 255


def render_sample(rng: np.random.Generator, num_classes: int, height: int, width: int,
                  max_shapes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask uint8 (H, W)) of one synthetic sample."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 90 + 25 * rng.standard_normal((height, width, 3)).astype(np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        c = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        kind = int(rng.integers(0, 3))
        if kind == 0:
            region = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        elif kind == 1:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            region = (yy >= cy - ry) & (yy <= cy + ry) & \
                (np.abs(xx - cx) <= rx * (yy - (cy - ry)) / (2 * ry))
        freq = 0.15 + 0.5 * c / num_classes
        stripes = 0.75 + 0.25 * np.sin(freq * (xx + yy))[..., None]
        colour = class_colour(c, num_classes)[None, None, :] * stripes
        image[region] = colour[region] + 8 * rng.standard_normal((int(region.sum()), 3))
        mask[region] = c
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_raw_samples(out: Path, num: int, num_classes: int, height: int, width: int,
                      seed: int = 0, progress: bool = True) -> list[RawSample]:
    """Render `num` samples as JPEG + PNG files under out/raw (deterministic for the seed)."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in tqdm(range(num), desc="rendering", unit="img", file=sys.stderr,
                  disable=not progress):
        key = f"synth_{i:06d}"
        img_path, lbl_path = raw / f"{key}.jpg", raw / f"{key}.png"
        if not (img_path.is_file() and lbl_path.is_file()):
            rng = np.random.default_rng([seed, i])
            image, mask = render_sample(rng, num_classes, height, width)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=92)
            img_path.write_bytes(buf.getvalue())
            Image.fromarray(mask, mode="L").save(lbl_path)
        samples.append(RawSample(key, img_path, lbl_path))
    return samples


def build_synthetic(out: str | Path, num: int, num_classes: int, size: tuple[int, int],
                    seed: int = 0, shard_size: int | str = "64MB", workers: int = 1,
                    progress: bool = True) -> Manifest:
    """Render and shard a synthetic dataset of `num` samples, `num_classes` classes
    (background included) and (height, width) `size` into `out`."""
    out = Path(out)
    spec = generic_spec("synthetic", num_classes)
    samples = write_raw_samples(out, num, num_classes, *size, seed=seed, progress=progress)
    manifest = build_shards(samples, spec, out, split="synthetic", shard_size=shard_size,
                            workers=workers, seed=seed, progress=progress)
    shutil.rmtree(out / "raw")  # the shards hold the same bytes; a re-run renders again
    return manifest
