"""Choosing and building the input pipeline of a worker for one step's selection.

`data.pipeline: auto` takes DALI on a GPU worker and the torch pipeline on CPU workers (the
faster one here: see tools/bench_data.py and the README), and the torch pipeline whenever
bad samples are to be skipped (DALI stops at a bad sample; skipping needs the torch path).
Both yield Batch(images, labels, skipped, bad_samples, keys) and read the samples of an
epoch as epoch_order says: in training, every rank the same number of full micro-batches
(`batches_per_epoch`), every selected sample at least once per epoch across the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from icd_dist.config import ConfigError, DataConfig
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions, dali_available
from icd_dist.data.manifest import load_manifest, select_records
from icd_dist.data.shard_files import is_remote
from icd_dist.data.torch_pipeline import AugmentConfig, Batch, ShardDataset, make_loader


def resolve_pipeline(data: DataConfig, on_gpu: bool) -> str:
    """'dali' or 'torch' for this worker, from data.pipeline, the device, bad_samples and
    where the shards are (DALI reads local files only)."""
    remote = any(is_remote(d) for d in (data.train_shards, data.eval_shards) if d)
    if data.pipeline == "dali" and remote:
        raise ConfigError("data.pipeline", "dali reads local shard files only; shards in an "
                          "object store need data.pipeline=torch (or auto)")
    if data.pipeline == "dali":
        if data.bad_samples == "skip":
            raise ConfigError("data.pipeline", "dali stops at the first bad sample; use "
                              "data.pipeline=torch (or auto) with data.bad_samples=skip")
        if not dali_available():
            raise ConfigError("data.pipeline", "dali is not installed here; use torch or auto")
        return "dali"
    if data.pipeline == "torch":
        return "torch"
    use_dali = on_gpu and not remote and data.bad_samples == "fail" and dali_available()
    return "dali" if use_dali else "torch"


class StepLoader:
    """One rank's loader over the selected samples of a shard folder; iterating it yields
    the Batches of one epoch (call set_epoch first: each epoch has its own permutation and
    augmentation). Training: `batches_per_epoch` full batches per epoch on every rank
    (default: enough to read every sample once)."""

    def __init__(self, data: DataConfig, shard_dir: str | Path, keys: Sequence[str],
                 lut: np.ndarray | None, train: bool, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device_id: int | None = None,
                 num_threads: int = 2, batches_per_epoch: int | None = None):
        self.kind = resolve_pipeline(data, device_id is not None)
        self.train = train
        self.epoch = 0
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.batches_per_epoch = batches_per_epoch if train else None
        self.loader_workers = data.loader_workers
        if self.kind == "dali":
            records = select_records(load_manifest(shard_dir), keys, shard_dir)
            options = DaliOptions(batch_size, train, data.crop_size,
                                  (data.scale_min, data.scale_max), hflip=data.hflip,
                                  crop_mode=data.crop_mode, eval_size=data.eval_size,
                                  seed=seed, num_threads=num_threads, device_id=device_id)
            per_rank = batches_per_epoch * batch_size if train and batches_per_epoch else None
            self._dali = DaliLoader(str(shard_dir), records, options, lut, rank, world_size,
                                    per_rank)
        else:
            augment = AugmentConfig(train, data.crop_size, (data.scale_min, data.scale_max),
                                    data.hflip, data.eval_size, crop_mode=data.crop_mode)
            self._dataset = ShardDataset(shard_dir, keys, lut, augment, seed, data.bad_samples)

    def set_epoch(self, epoch: int) -> None:
        """Read `epoch` next: its permutation and its augmentation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.kind == "dali":
            self._dali.set_epoch(self.epoch)
            for images, labels, keys in self._dali:
                yield Batch(images, labels, 0, (), keys)
            return
        yield from make_loader(self._dataset, self.batch_size, self.rank, self.world_size,
                               self.loader_workers, self.epoch, self.seed, shuffle=self.train,
                               batches_per_epoch=self.batches_per_epoch)
