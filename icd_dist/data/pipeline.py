"""Choosing and building the input pipeline of a worker for one step's selection.

`data.pipeline: auto` takes DALI on a GPU worker and the torch pipeline on CPU workers (the
faster one here: see tools/bench_data.py and the README), and the torch pipeline whenever
bad samples are to be skipped (DALI stops at a bad sample; skipping needs the torch path).
Both yield Batch(images, labels, skipped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from icd_dist.config import ConfigError, DataConfig
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions, dali_available
from icd_dist.data.manifest import load_manifest, write_step_index
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
    the Batches of one epoch (call set_epoch first for a new shuffle)."""

    def __init__(self, data: DataConfig, shard_dir: str | Path, keys: Sequence[str],
                 lut: np.ndarray | None, train: bool, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device_id: int | None = None,
                 index_dir: str | Path | None = None, num_threads: int = 2):
        self.kind = resolve_pipeline(data, device_id is not None)
        self.train = train
        self.epoch = 0
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.loader_workers = data.loader_workers
        if self.kind == "dali":
            manifest = load_manifest(shard_dir)
            index_dir = Path(index_dir or Path(shard_dir) / "index")
            tars, idx = write_step_index(manifest, shard_dir, keys, index_dir)
            options = DaliOptions(batch_size, train, data.crop_size,
                                  (data.scale_min, data.scale_max), hflip=data.hflip,
                                  crop_mode=data.crop_mode, eval_size=data.eval_size,
                                  seed=seed, num_threads=num_threads, device_id=device_id)
            self._dali = DaliLoader(tars, idx, options, lut, rank, world_size)
        else:
            augment = AugmentConfig(train, data.crop_size, (data.scale_min, data.scale_max),
                                    data.hflip, data.eval_size, crop_mode=data.crop_mode)
            self._dataset = ShardDataset(shard_dir, keys, lut, augment, seed, data.bad_samples)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and augment for `epoch` (DALI reshuffles by itself every epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.kind == "dali":
            for images, labels in self._dali:
                yield Batch(images, labels, 0)
            return
        yield from make_loader(self._dataset, self.batch_size, self.rank, self.world_size,
                               self.loader_workers, self.epoch, self.seed, shuffle=self.train)
