"""The DALI input pipeline: the encoded samples of an epoch, in epoch_order's order and split
(the torch pipeline's), read by their manifest offsets and handed to DALI by an external
source; decoded on the GPU ("mixed") when the worker has one and by DALI's CPU operators
otherwise (device_id=None). EXIF orientation is ignored, as by torchvision's decode_image and
the shard writer (the label was drawn on the stored pixels).

Each DaliLoader builds its pipeline once, at its first iteration, and feeds every epoch (and
every evaluation, every extra pass) through it: the external source hands DALI the epoch's
samples AND their random draws, computed in numpy per sample from (seed, epoch, position) by
`augmentation_draws` (the position is global across ranks, as in the torch pipeline, so each
rank draws its own). An epoch's augmentation is thus a pure function of its samples' positions
whatever ran before it (a resumed step draws what the uninterrupted one drew), and the
pipeline holds no random state. The source raises StopIteration at the epoch's end and the
iterator is reset before the next epoch starts; an epoch read only in part (a `break` at the
iteration budget) is ended first: the source stops and the batches DALI already prefetched
are dropped (a DALI iterator ignores a reset in mid-epoch), so that no epoch starts from
another's leftovers.

Same semantics as transforms.py, from numpy's uniforms instead of torch's: crop_mode "inside"
is MiB/PLOP's RandomResizedCrop (10 draws of a box of area s * H * W, s ~ U(scale),
log-uniform aspect, sides rounded half to even; the first that fits in the image placed
uniformly inside it, else their central fallback), computed in float64 by `inside_crop_box`,
the operator version of transforms.crop_box_from_uniforms (the same box from the same
uniforms); the box always lies in the image. crop_mode "padded" is the previous variant (one
draw, placed to overlap the image as much as it can, padded with 0 / 255). Then resize to the
crop (linear for the image, nearest for the mask), one flip for both; evaluation resizes the
shorter side (same rounding) and centre-crops. The step's label lookup table is applied in
torch after the iterator, on the labels' device, by a table built once per loader and device
(css.remap.DeviceLut; no host synchronisation per batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.css.remap import DeviceLut
from icd_dist.data.epoch_order import eval_indices, train_positions
from icd_dist.data.fork_safety import note_fork_unsafe
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


def augmentation_draws(seed: int, epoch: int, position: int, hflip: bool = True) -> tuple:
    """The random draws of the training sample at `position` of `epoch`, a pure function of
    (seed, epoch, position): u_scale, u_ratio (float64 (CROP_ATTEMPTS,)) and u_top, u_left
    (float64 scalars), uniforms in [0, 1), and the flip (int32 0 or 1; 0 without hflip).
    Crop mode "padded" uses the first u_scale and u_ratio only."""
    n = CROP_ATTEMPTS
    u = np.random.default_rng(np.random.SeedSequence([seed, epoch, position])).random(2 * n + 3)
    return u[:n], u[n:2 * n], u[2 * n], u[2 * n + 1], np.int32(hflip and u[2 * n + 2] < 0.5)


def _build_pipeline(source, o: DaliOptions):
    """The pipeline over the batches `source` returns: encoded (jpg, png), followed in
    training by the draws of `augmentation_draws`."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    note_fork_unsafe("a DALI pipeline")  # its threads: loader workers are spawned from now on

    @pipeline_def(batch_size=o.batch_size, num_threads=o.num_threads, device_id=o.device_id,
                  exec_dynamic=True)
    def css_pipeline():
        encoded = [types.UINT8, types.UINT8]
        draws = [types.FLOAT64] * 4 + [types.INT32] if o.train else []
        jpg, png, *drawn = fn.external_source(source=source, num_outputs=len(encoded + draws),
                                              batch=True, dtype=encoded + draws)
        gpu = o.device_id is not None
        # EXIF orientation ignored (adjust_orientation=False) by the decoder and the peek alike
        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        label = fn.decoders.image(png, device="cpu", output_type=types.ANY_DATA,
                                  adjust_orientation=False)
        if gpu:
            label = label.gpu()
        shape = fn.peek_image_shape(jpg, dtype=types.FLOAT64, adjust_orientation=False)
        height, width = shape[0], shape[1]
        flip = 0
        if o.train:
            u_scale, u_ratio, u_top, u_left, flip = drawn
            if o.crop_mode == "inside":
                top, left, h, w = inside_crop_box(height, width, u_scale, u_ratio, u_top,
                                                  u_left, o.scale, o.ratio)
            else:
                top, left, h, w = _padded_crop_box(height, width, u_scale[0], u_ratio[0],
                                                   u_top, u_left, o.scale, o.ratio, dmath)
            # integer values: exact as int32 (slice takes no float64)
            anchor = fn.cast(fn.stack(top, left), dtype=types.INT32)
            box = fn.cast(fn.stack(h, w), dtype=types.INT32)
            image, label = _crop_pair(fn, image, label, anchor, box,
                                      inside=o.crop_mode == "inside")
            size = [o.crop_size, o.crop_size]
            image, label = _resize_pair(fn, types, image, label, size)
            label = fn.flip(label, horizontal=flip)
        elif o.eval_size is not None:
            size = float(o.eval_size)
            short = dmath.min(height, width)
            # multiply first: the shorter side then comes out exactly `size`
            new_h = dmath.max(dmath.floor(height * size / short + 0.5), 1.0)
            new_w = dmath.max(dmath.floor(width * size / short + 0.5), 1.0)
            new_size = fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT)
            image, label = _resize_pair(fn, types, image, label, new_size)
            anchor = fn.stack(dmath.floor((new_h - size) / 2), dmath.floor((new_w - size) / 2))
            box = fn.stack(new_h * 0 + size, new_w * 0 + size)
            image, label = _crop_pair(fn, image, label, fn.cast(anchor, dtype=types.INT32),
                                      fn.cast(box, dtype=types.INT32))
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


def _padded_crop_box(height, width, u_scale, u_ratio, u_top, u_left, scale, ratio, dmath):
    """(top, left, h, w) float64 DataNodes of the "padded" crop: one box of area s * H * W,
    s ~ U(scale), log-uniform aspect, sides rounded half up, placed to overlap the image as
    much as it can."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_scale)
    aspect = dmath.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = dmath.max(dmath.floor(dmath.sqrt(area * aspect) + 0.5), 1.0)
    h = dmath.max(dmath.floor(dmath.sqrt(area / aspect) + 0.5), 1.0)
    return _place(height, h, u_top, dmath), _place(width, w, u_left, dmath), h, w


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


class _Feed:
    """DALI's external source, a callable: each call returns the next batch of the epoch set
    by `start` (lists of uint8 arrays jpg and png, read at the manifest's offsets, then in
    training the samples' `augmentation_draws`) and raises StopIteration at the epoch's end;
    remembers the keys of each batch it gave, in order (DALI keeps the order)."""

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.start([], 0)

    def start(self, plan: list[tuple[int, int]], epoch: int) -> None:
        """Read `plan`'s (record index, position) pairs of `epoch` from the next call on."""
        self.plan, self.epoch, self.next = plan, epoch, 0
        self.keys: list[tuple[str, ...]] = []

    def stop(self) -> None:
        """End the epoch now: the next call raises StopIteration."""
        self.next = len(self.plan)

    def __call__(self):
        if self.next >= len(self.plan):
            raise StopIteration
        o = self.loader.options
        batch = self.plan[self.next: self.next + o.batch_size]
        self.next += len(batch)
        jpgs, pngs = [], []
        for i, _ in batch:
            jpg, png = self.loader.read(i)
            jpgs.append(np.frombuffer(jpg, dtype=np.uint8))
            pngs.append(np.frombuffer(png, dtype=np.uint8))
        self.keys.append(tuple(self.loader.records[i].key for i, _ in batch))
        if not o.train:
            return jpgs, pngs
        draws = [augmentation_draws(o.seed, self.epoch, p, o.hflip) for _, p in batch]
        return (jpgs, pngs, *(list(d) for d in zip(*draws, strict=True)))


def _outputs(iterator) -> Iterator[dict[str, torch.Tensor]]:
    """A DALI iterator's batches up to the end of the epoch (by next(): iter() would reset
    it)."""
    while True:
        try:
            yield next(iterator)[0]
        except StopIteration:
            return


class DaliLoader:
    """One rank's epochs over the selected samples `records` of the local shard folder
    `shard_dir`: iterating yields (images float32 (N, 3, h, w), labels int64 (N, h, w) with
    `lut` applied, keys) for epoch_order's samples of the current epoch (set_epoch). Training
    reads `samples_per_rank` samples per epoch (default ceil(len / world)); evaluation every
    sample once across the ranks. One DALI pipeline serves every epoch (built at the first
    iteration)."""

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
        self.lut = DeviceLut(lut) if lut is not None else None
        self.rank, self.world_size = rank, world_size
        self.samples_per_rank = samples_per_rank or -(-len(self.records) // world_size)
        self.epoch = 0
        self._files: dict[str, ShardFile] = {}
        self._feed = _Feed(self)
        self._iterator = None  # the DALI iterator over the pipeline, from the first iteration

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its order and augmentation)."""
        self.epoch = epoch

    def plan(self) -> list[tuple[int, int]]:
        """(record index, position) pairs this rank reads in the current epoch, in order (the
        position seeds the augmentation; in evaluation it is the index)."""
        if self.options.train:
            return train_positions(len(self.records), self.options.seed, self.epoch,
                                   self.rank, self.world_size, self.samples_per_rank)
        return [(i, i) for i in eval_indices(len(self.records), self.rank, self.world_size)]

    def __len__(self) -> int:
        return -(-len(self.plan()) // self.options.batch_size)

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

        plan = self.plan()
        if not plan:  # evaluation on more ranks than samples: nothing for this rank
            return
        if self._iterator is None:
            self._feed.start(plan, self.epoch)
            self._iterator = DALIGenericIterator(
                [_build_pipeline(self._feed, self.options)], ["images", "labels"],
                last_batch_policy=LastBatchPolicy.PARTIAL)
        else:
            self._feed.stop()  # end an epoch read in part, dropping what DALI prefetched
            for _ in _outputs(self._iterator):
                pass
            self._feed.start(plan, self.epoch)
            self._iterator.reset()
        for n, out in enumerate(_outputs(self._iterator)):
            labels = out["labels"][..., 0]
            labels = self.lut(labels) if self.lut is not None else labels.long()
            yield out["images"], labels, self._feed.keys[n]
