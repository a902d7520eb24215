"""The DALI input pipeline: the encoded samples of an epoch, in epoch_order's order and split
(the torch pipeline's), read by their manifest offsets and handed to DALI by an external
source; decoded on the GPU ("mixed") when the worker has one and by DALI's CPU operators
otherwise (device_id=None).

Every epoch builds its pipeline afresh, seeded by (seed, rank, epoch): each rank has its own
augmentation stream, an epoch's augmentation does not depend on what ran before it (a resumed
step draws what the uninterrupted one drew), and no epoch ever starts from another's leftovers
(DALI's reader ignores a reset in mid-epoch; a fresh pipeline has nothing left over).

Same semantics as transforms.py, with DALI's random generator: crop_mode "inside" is MiB/PLOP's
RandomResizedCrop (10 draws of a box of area s * H * W, s ~ U(scale), log-uniform aspect,
sides rounded half to even; the first that fits in the image placed uniformly inside it, else
their central fallback), computed in float64 by `inside_crop_box`, the operator version of
transforms.crop_box_from_uniforms (the same box from the same uniforms); the box always lies
in the image. crop_mode "padded" is the previous variant (one draw, placed to overlap the image
as much as it can, padded with 0 / 255). Then resize to the crop (linear for the image, nearest
for the mask), one flip for both; evaluation resizes the shorter side (same rounding) and
centre-crops. The step's label lookup table is applied in torch after the iterator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.css.remap import apply_lut
from icd_dist.data.epoch_order import eval_indices, train_positions
from icd_dist.data.manifest import SampleRecord
from icd_dist.data.sample_io import read_member
from icd_dist.data.shard_files import ShardFile, join
from icd_dist.data.transforms import CROP_ATTEMPTS, CROP_MODES, IMAGENET_MEAN, IMAGENET_STD


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
    crop_mode: str = "inside"  # "inside" (MiB/PLOP) or "padded", as transforms.py


def _build_pipeline(source, o: DaliOptions, seed: int):
    """The pipeline over the encoded (jpg, png) batches that `source` yields."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(batch_size=o.batch_size, num_threads=o.num_threads, device_id=o.device_id,
                  seed=seed, exec_dynamic=True)
    def css_pipeline():
        jpg, png = fn.external_source(source=source, num_outputs=2, batch=True,
                                      cycle="raise", dtype=types.UINT8)
        gpu = o.device_id is not None
        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        label = fn.decoders.image(png, device="cpu", output_type=types.ANY_DATA)
        if gpu:
            label = label.gpu()
        shape = fn.peek_image_shape(jpg, dtype=types.FLOAT)
        height, width = shape[0], shape[1]
        if o.train and o.crop_mode == "inside":
            u_scale, u_ratio = (fn.random.uniform(range=[0.0, 1.0], shape=[CROP_ATTEMPTS],
                                                  dtype=types.FLOAT64) for _ in range(2))
            u_top, u_left = (fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT64)
                             for _ in range(2))
            shape64 = fn.cast(shape, dtype=types.FLOAT64)
            top, left, h, w = inside_crop_box(shape64[0], shape64[1], u_scale, u_ratio,
                                              u_top, u_left, o.scale, o.ratio)
            # integer values: exact as int32 (slice takes no float64)
            anchor = fn.cast(fn.stack(top, left), dtype=types.INT32)
            box = fn.cast(fn.stack(h, w), dtype=types.INT32)
            image, label = _crop_pair(fn, image, label, anchor, box, inside=True)
        elif o.train:
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
        if o.train:
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


def _crop_pair(fn, image, label, anchor, box, inside=False):
    """The same box (absolute pixels) from image and label: inside=True, the box must lie in
    the image (DALI raises otherwise); else it may leave it, padded with 0 (image) and 255
    (label)."""
    policy = "error" if inside else "pad"

    def crop(data, fill):
        return fn.slice(data, anchor, box, axes=[0, 1], normalized_anchor=False,
                        normalized_shape=False, out_of_bounds_policy=policy, fill_values=fill)
    return crop(image, 0), crop(label, IGNORE_INDEX)


def _resize_pair(fn, types, image, label, size):
    """Image linear (antialiased), label nearest-neighbour, to the same size."""
    return (fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=True),
            fn.resize(label, size=size, interp_type=types.INTERP_NN, antialias=False))


def _place(size, box, u, dmath):
    lo = dmath.min(size - box, 0.0)
    hi = dmath.max(size - box, 0.0)
    return lo + dmath.floor(u * (hi - lo + 1))


def _round_half_even(x, dmath):
    """Python's round() of a non-negative float64 DataNode: nearest integer, ties to even."""
    r = dmath.floor(x)
    d = x - r  # exact
    odd = r - 2.0 * dmath.floor(r * 0.5)
    return r + (d > 0.5) + (d == 0.5) * odd


def inside_crop_box(height, width, u_scale, u_ratio, u_top, u_left,
                    scale: tuple[float, float] = (0.5, 2.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """(top, left, h, w) float64 DataNodes (integer values) of MiB/PLOP's RandomResizedCrop,
    exactly transforms.crop_box_from_uniforms with DALI operators (to be called in a pipeline
    definition): height, width float64 scalars; u_scale, u_ratio float64 (CROP_ATTEMPTS,)
    uniforms in [0, 1); u_top, u_left float64 scalar uniforms. All attempts are computed at
    once and the first that fits is picked (index CROP_ATTEMPTS: the central fallback)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    n = CROP_ATTEMPTS
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = (scale[0] + (scale[1] - scale[0]) * u_scale) * (height * width)
    aspect = dmath.exp(log_lo + (log_hi - log_lo) * u_ratio)
    ws = _round_half_even(dmath.sqrt(target * aspect), dmath)
    hs = _round_half_even(dmath.sqrt(target / aspect), dmath)
    fits = fn.cast((ws <= width) & (hs <= height), dtype=types.INT32)
    # attempt k if it fits, else n; the smallest is the first that fits (n: none did)
    order = types.Constant(np.arange(n, dtype=np.int32), dtype=types.INT32)
    first = fn.reductions.min(fits * (order - n) + n)
    # the central fallback, as candidate number n
    in_ratio = width / height
    narrow = fn.cast(in_ratio < min(ratio), dtype=types.FLOAT64)
    wide = fn.cast(in_ratio > max(ratio), dtype=types.FLOAT64)
    fb_w = wide * _round_half_even(height * max(ratio), dmath) + (1.0 - wide) * width
    fb_h = narrow * _round_half_even(width / min(ratio), dmath) + (1.0 - narrow) * height
    w = fn.cat(ws, fn.stack(fb_w))[first]
    h = fn.cat(hs, fn.stack(fb_h))[first]
    fallback = fn.cast(first == n, dtype=types.FLOAT64)
    top = (fallback * dmath.floor((height - h) * 0.5)
           + (1.0 - fallback) * dmath.min(dmath.floor(u_top * (height - h + 1.0)), height - h))
    left = (fallback * dmath.floor((width - w) * 0.5)
            + (1.0 - fallback) * dmath.min(dmath.floor(u_left * (width - w + 1.0)), width - w))
    return top, left, h, w


class _EpochSource:
    """The encoded batches of one epoch for DALI's external source: lists of uint8 arrays
    (jpg, png), read at the manifest's offsets; remembers the keys of each batch it gave, in
    order (DALI keeps the order)."""

    def __init__(self, loader: DaliLoader, indices: list[int]):
        self.loader = loader
        self.indices = indices
        self.keys: list[tuple[str, ...]] = []
        self.next = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.next >= len(self.indices):
            raise StopIteration
        batch = self.indices[self.next: self.next + self.loader.options.batch_size]
        self.next += len(batch)
        jpgs, pngs = [], []
        for i in batch:
            jpg, png = self.loader.read(i)
            jpgs.append(np.frombuffer(jpg, dtype=np.uint8))
            pngs.append(np.frombuffer(png, dtype=np.uint8))
        self.keys.append(tuple(self.loader.records[i].key for i in batch))
        return jpgs, pngs


class DaliLoader:
    """One rank's epochs over the selected samples `records` of the local shard folder
    `shard_dir`: iterating yields (images float32 (N, 3, h, w), labels int64 (N, h, w) with
    `lut` applied, keys) for epoch_order's samples of the current epoch (set_epoch). Training
    reads `samples_per_rank` samples per epoch (default ceil(len / world)); evaluation every
    sample once across the ranks."""

    def __init__(self, shard_dir: str, records: Sequence[SampleRecord], options: DaliOptions,
                 lut: np.ndarray | None, rank: int = 0, world_size: int = 1,
                 samples_per_rank: int | None = None):
        if options.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {options.crop_mode!r}")
        if not records:
            raise ValueError("the selection is empty: no shard has a selected sample")
        self.shard_dir = str(shard_dir)
        self.records = list(records)
        self.options = options
        self.lut = lut
        self.rank, self.world_size = rank, world_size
        self.samples_per_rank = samples_per_rank or -(-len(self.records) // world_size)
        self.epoch = 0
        self._files: dict[str, ShardFile] = {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its order and augmentation)."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """The record indices this rank reads in the current epoch, in order."""
        if self.options.train:
            return [i for i, _ in train_positions(len(self.records), self.options.seed,
                                                  self.epoch, self.rank, self.world_size,
                                                  self.samples_per_rank)]
        return eval_indices(len(self.records), self.rank, self.world_size)

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.options.batch_size)

    def read(self, index: int) -> tuple[bytes, bytes]:
        """The encoded (jpg, png) of record `index`."""
        rec = self.records[index]
        f = self._files.get(rec.shard)
        if f is None:
            f = self._files[rec.shard] = ShardFile(join(self.shard_dir, rec.shard))
        return (read_member(f, *rec.image, rec.shard, rec.key, "image"),
                read_member(f, *rec.label, rec.shard, rec.key, "label"))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        indices = self.indices()
        if not indices:  # evaluation on more ranks than samples: nothing for this rank
            return
        source = _EpochSource(self, indices)
        seed = int(np.random.SeedSequence([self.options.seed, self.rank, self.epoch])
                   .generate_state(1)[0] % (2**31 - 1))
        pipeline = _build_pipeline(source, self.options, seed)
        iterator = DALIGenericIterator([pipeline], ["images", "labels"],
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        for n, out in enumerate(iterator):
            images = out[0]["images"]
            labels = out[0]["labels"][..., 0]
            labels = apply_lut(self.lut, labels) if self.lut is not None else labels.long()
            yield images, labels, source.keys[n]
