"""Reading one sample of a shard by its manifest offsets and decoding it, with checks.

Members are read in memory at the offsets the manifest gives; nothing is ever extracted
by the names stored in a tar, so a hostile shard cannot write files.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.data.errors import BadSampleError
from icd_dist.data.manifest import SampleRecord
from icd_dist.data.shard_files import ShardFile


def read_member(f: ShardFile, offset: int, size: int, shard: str, key: str, what: str) -> bytes:
    """`size` bytes at `offset` of an open shard (local or remote); BadSampleError if the
    shard is truncated."""
    data = f.read_at(size, offset)
    if len(data) != size:
        raise BadSampleError(f"shard is truncated: {what} needs {size} bytes at {offset}, "
                             f"got {len(data)}", key, shard)
    return data


def decode_sample(jpg: bytes, png: bytes, record: SampleRecord, num_classes: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image uint8 (3, H, W), label uint8 (H, W)) of a sample; BadSampleError naming it for
    a corrupt JPEG/PNG, an image/label size mismatch or a label id outside the classes."""
    key, shard = record.key, record.shard
    try:
        image = decode_image(torch.frombuffer(bytearray(jpg), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise BadSampleError(f"corrupt image: {exc}", key, shard) from None
    try:
        label = decode_image(torch.frombuffer(bytearray(png), dtype=torch.uint8),
                             mode=ImageReadMode.UNCHANGED)
    except RuntimeError as exc:
        raise BadSampleError(f"corrupt label: {exc}", key, shard) from None
    if label.shape[0] != 1:
        raise BadSampleError(f"label has {label.shape[0]} channels, expected 1", key, shard)
    label = label[0]
    if tuple(image.shape[1:]) != tuple(label.shape):
        raise BadSampleError(f"image is {image.shape[2]}x{image.shape[1]} but label is "
                             f"{label.shape[1]}x{label.shape[0]}", key, shard)
    ids = np.flatnonzero(np.bincount(label.numpy().ravel(), minlength=256))
    bad = [int(i) for i in ids if i >= num_classes and i != IGNORE_INDEX]
    if bad:
        raise BadSampleError(f"label ids {bad} outside 0..{num_classes - 1} (and "
                             f"{IGNORE_INDEX})", key, shard)
    return image, label
