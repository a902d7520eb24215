"""The torch input pipeline: random access into the shards by the manifest's offsets, decoded
with torchvision.io, in a DataLoader with worker processes.

Random access (rather than streaming the tars) gives exact epoch semantics: the samples of
an epoch and their split across ranks are epoch_order's (as the DALI pipeline's), every loader
worker reads whichever samples it is handed, and each sample's augmentation is seeded by
(seed, epoch, position in the epoch), so results do not depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from icd_dist.css.remap import apply_lut
from icd_dist.data.epoch_order import eval_indices, train_positions
from icd_dist.data.errors import BadSampleError
from icd_dist.data.fork_safety import loader_context
from icd_dist.data.manifest import load_manifest, select_records
from icd_dist.data.sample_io import decode_sample, read_member
from icd_dist.data.shard_files import ShardFile, exists, is_remote, join
from icd_dist.data.transforms import eval_transform, normalize, train_transform


@dataclass(frozen=True)
class AugmentConfig:
    """Training or evaluation transform settings."""

    train: bool
    crop_size: int = 512
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    eval_size: int | None = 512  # None: no resize or crop (raw decode)
    crop_mode: str = "inside"  # "inside" (MiB/PLOP's RandomResizedCrop) or "padded"


@dataclass(frozen=True)
class SkippedSample:
    """A bad sample left out (data.bad_samples=skip): where it is and what is wrong."""

    shard: str
    key: str
    reason: str


class ShardDataset(Dataset):
    """The selected samples of a shard folder; items are (image uint8 (3, h, w), label int64
    (h, w)) with `lut` applied, or a SkippedSample for a bad sample when bad_samples ==
    "skip"."""

    def __init__(self, shard_dir: str | Path, keys: Sequence[str] | None, lut: np.ndarray | None,
                 augment: AugmentConfig, seed: int = 0, bad_samples: str = "fail"):
        if bad_samples not in ("fail", "skip"):
            raise ValueError(f"bad_samples must be 'fail' or 'skip', got {bad_samples!r}")
        self.shard_dir = str(shard_dir) if is_remote(shard_dir) else Path(shard_dir)
        manifest = load_manifest(self.shard_dir)
        self.num_classes = manifest.num_classes
        self.records = select_records(manifest, keys, self.shard_dir)
        self.lut = lut
        self.augment = augment
        self.seed = seed
        self.bad_samples = bad_samples
        self.epoch = 0
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation randomness of an epoch (call before iterating)."""
        self.epoch = epoch

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files stay in the process that opened them
        return state

    def _file(self, shard: str):
        f = self._files.get(shard)
        if f is None:
            path = join(self.shard_dir, shard)
            if not exists(path):
                raise BadSampleError("shard file is missing", shard=shard)
            f = self._files[shard] = ShardFile(path)  # cached per loader worker
        return f

    @property
    def remote(self) -> bool:
        """Whether the shards are read from an object store."""
        return is_remote(self.shard_dir)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (image uint8 (3, H, W), label uint8 (H, W)) of sample `index`, unaugmented."""
        rec = self.records[index]
        f = self._file(rec.shard)
        jpg = read_member(f, *rec.image, rec.shard, rec.key, "image")
        png = read_member(f, *rec.label, rec.shard, rec.key, "label")
        return decode_sample(jpg, png, rec, self.num_classes)

    def __getitem__(self, item: int | tuple[int, int]):
        """The sample `item` (an index, or (index, position in the epoch) as EpochSampler
        yields), augmented for the current epoch (the position, else the index, seeds it)."""
        index, position = item if isinstance(item, tuple) else (item, item)
        try:
            image, label = self.load(index)
        except BadSampleError as exc:
            if self.bad_samples == "fail":
                raise
            rec = self.records[index]
            return SkippedSample(exc.shard or rec.shard, exc.key or rec.key, exc.reason)
        a = self.augment
        if a.train:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, self.epoch, position]).generate_state(1)[0]))
            image, label = train_transform(image, label, a.crop_size, g, a.scale, a.hflip,
                                           mode=a.crop_mode)
        elif a.eval_size is not None:
            image, label = eval_transform(image, label, a.eval_size)
        if self.lut is not None:
            label = apply_lut(self.lut, label, source=self.records[index].key)
        else:
            label = label.long()
        return image, label, self.records[index].key


@dataclass
class Batch:
    """A batch: images (N, 3, h, w) float32, labels (N, h, w) int64, the number of bad
    samples skipped and which they were, and the keys of its samples."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int
    bad_samples: tuple[SkippedSample, ...] = ()
    keys: tuple[str, ...] = ()


def collate_skipping_bad(items: list) -> Batch:
    """Stack the good items of a batch (images stay uint8) and list the bad ones
    (SkippedSample)."""
    bad = tuple(it for it in items if isinstance(it, SkippedSample))
    good = [it for it in items if not isinstance(it, SkippedSample)]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8),
                     torch.empty(0, 0, 0, dtype=torch.long), len(bad), bad)
    return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]),
                 len(bad), bad, tuple(g[2] for g in good))


class NormalizingLoader:
    """A DataLoader whose uint8 batches are normalised in the iterating process (workers move
    4x fewer bytes); yields Batch with float32 images."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield Batch(normalize(batch.images), batch.labels, batch.skipped,
                        batch.bad_samples, batch.keys)


class EpochSampler(Sampler[tuple[int, int]]):
    """A training epoch of one rank as epoch_order.train_positions says: (index, position)
    pairs, `samples_per_rank` of them."""

    def __init__(self, length: int, seed: int, epoch: int, rank: int, world_size: int,
                 samples_per_rank: int):
        self.items = train_positions(length, seed, epoch, rank, world_size, samples_per_rank)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class ContiguousShardSampler(Sampler[int]):
    """Rank r of w takes indices r, r + w, ...: every sample exactly once over all ranks,
    no padding (for evaluation, where a repeated sample would be counted twice)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = eval_indices(length, rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: ShardDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2, epoch: int = 0, seed: int = 0,
                shuffle: bool | None = None, batches_per_epoch: int | None = None
                ) -> NormalizingLoader:
    """A DataLoader over this rank's part of the dataset for `epoch`. Training (shuffle):
    epoch_order's permutation and split, `batches_per_epoch` full batches on every rank
    (default: enough for every sample once, ceil(len / world) samples per rank, the last
    batch possibly partial); evaluation: a contiguous split with every sample exactly once."""
    shuffle = dataset.augment.train if shuffle is None else shuffle
    dataset.set_epoch(epoch)
    if shuffle:
        per_rank = batches_per_epoch * batch_size if batches_per_epoch else \
            -(-len(dataset) // world_size)
        sampler: Sampler = EpochSampler(len(dataset), seed, epoch, rank, world_size, per_rank)
    else:
        sampler = ContiguousShardSampler(len(dataset), rank, world_size)
    # spawned workers open their own object-store clients and start no DALI threads
    context = loader_context(num_workers, dataset.remote)
    return NormalizingLoader(DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_skipping_bad, drop_last=False, persistent_workers=False,
        pin_memory=torch.cuda.is_available(), multiprocessing_context=context))
