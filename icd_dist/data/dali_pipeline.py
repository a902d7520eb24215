"""The DALI input pipeline: fn.readers.webdataset over the step's index files (only the
selected samples), sharded by rank, decoded on the GPU ("mixed") when the worker has one and
by DALI's CPU operators otherwise (device_id=None).

Same semantics as transforms.py: the crop box (area s * H * W, s ~ U(scale), log-uniform
aspect, placed to overlap the image as much as it can, padded with 0 / 255), resize to the
crop (linear for the image, nearest for the mask), one flip for both; evaluation resizes
the shorter side (same rounding) and centre-crops. The step's label lookup table is applied
in torch after the iterator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icd_dist.css.remap import apply_lut
from icd_dist.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD


def dali_available() -> bool:
    """Whether nvidia.dali imports here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class DaliOptions:
    """Pipeline settings."""

    batch_size: int
    train: bool
    crop_size: int = 512
    scale: tuple[float, float] = (0.5, 2.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    eval_size: int | None = 512
    seed: int = 0
    num_threads: int = 2
    device_id: int | None = None  # None = CPU operators only
    shuffle_buffer: int = 256


def _build_pipeline(paths: Sequence[str], index_paths: Sequence[str], shard_id: int,
                    num_shards: int, o: DaliOptions):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(batch_size=o.batch_size, num_threads=o.num_threads, device_id=o.device_id,
                  seed=o.seed, exec_dynamic=True)
    def css_pipeline():
        jpg, png = fn.readers.webdataset(
            paths=list(paths), index_paths=list(index_paths), ext=["jpg", "png"],
            shard_id=shard_id, num_shards=num_shards, random_shuffle=o.train,
            initial_fill=o.shuffle_buffer, seed=o.seed, name="reader",
            missing_component_behavior="error", pad_last_batch=False)
        gpu = o.device_id is not None
        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        label = fn.decoders.image(png, device="cpu", output_type=types.ANY_DATA)
        if gpu:
            label = label.gpu()
        shape = fn.peek_image_shape(jpg, dtype=types.FLOAT)
        height, width = shape[0], shape[1]
        if o.train:
            s = fn.random.uniform(range=list(o.scale))
            log_r = fn.random.uniform(range=[math.log(o.ratio[0]), math.log(o.ratio[1])])
            aspect = dmath.exp(log_r)
            area = height * width * s
            w = dmath.max(dmath.floor(dmath.sqrt(area * aspect) + 0.5), 1.0)
            h = dmath.max(dmath.floor(dmath.sqrt(area / aspect) + 0.5), 1.0)
            top = _place(height, h, fn.random.uniform(range=[0.0, 1.0]), dmath)
            left = _place(width, w, fn.random.uniform(range=[0.0, 1.0]), dmath)
            anchor, box = fn.stack(top, left), fn.stack(h, w)
            image, label = _crop_pair(fn, image, label, anchor, box)
            size = [o.crop_size, o.crop_size]
            image, label = _resize_pair(fn, types, image, label, size)
            flip = fn.random.coin_flip(probability=0.5 if o.hflip else 0.0)
            label = fn.flip(label, horizontal=flip)
        elif o.eval_size is not None:
            size = float(o.eval_size)
            short = dmath.min(height, width)
            # multiply first: the shorter side then comes out exactly `size`
            new_h = dmath.max(dmath.floor(height * size / short + 0.5), 1.0)
            new_w = dmath.max(dmath.floor(width * size / short + 0.5), 1.0)
            new_size = fn.stack(new_h, new_w)
            image, label = _resize_pair(fn, types, image, label, new_size)
            anchor = fn.stack(dmath.floor((new_h - size) / 2), dmath.floor((new_w - size) / 2))
            box = fn.stack(new_h * 0 + size, new_w * 0 + size)
            image, label = _crop_pair(fn, image, label, anchor, box)
            flip = 0
        else:
            flip = 0
        image = fn.crop_mirror_normalize(
            image, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])
        return image, label

    return css_pipeline()


def _crop_pair(fn, image, label, anchor, box):
    """The same box (absolute pixels, may leave the image) from image (padded with 0) and
    label (padded with 255)."""
    def crop(data, fill):
        return fn.slice(data, anchor, box, axes=[0, 1], normalized_anchor=False,
                        normalized_shape=False, out_of_bounds_policy="pad", fill_values=fill)
    return crop(image, 0), crop(label, IGNORE_INDEX)


def _resize_pair(fn, types, image, label, size):
    """Image linear (antialiased), label nearest-neighbour, to the same size."""
    return (fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=True),
            fn.resize(label, size=size, interp_type=types.INTERP_NN, antialias=False))


def _place(size, box, u, dmath):
    lo = dmath.min(size - box, 0.0)
    hi = dmath.max(size - box, 0.0)
    return lo + dmath.floor(u * (hi - lo + 1))


class DaliLoader:
    """Iterates (images float32 (N, 3, h, w), labels int64 (N, h, w) with `lut` applied) over
    one epoch of this rank's part of the selected samples; iterate again for the next epoch."""

    def __init__(self, paths: Sequence[str], index_paths: Sequence[str], options: DaliOptions,
                 lut: np.ndarray | None, rank: int = 0, world_size: int = 1):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if not paths:
            raise ValueError("the selection is empty: no shard has a selected sample")
        self.pipeline = _build_pipeline(paths, index_paths, rank, world_size, options)
        self.iterator = DALIGenericIterator(
            [self.pipeline], ["images", "labels"], reader_name="reader",
            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self.lut = lut

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for out in self.iterator:
            images = out[0]["images"]
            labels = out[0]["labels"][..., 0]
            labels = apply_lut(self.lut, labels) if self.lut is not None else labels.long()
            yield images, labels
