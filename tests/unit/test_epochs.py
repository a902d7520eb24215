"""Training epochs that are epochs, for the DALI (CPU operators) and torch pipelines alike:
2 ranks, accumulation 2 and a sample count that no global batch divides; over 3 epochs every
sample is read at least once per epoch across the ranks, every rank runs the same number of
full micro-batches (whole optimiser steps), each epoch has its own permutation of the whole
selection, an epoch reads the same again when asked again (what resuming needs), and the
ranks draw different augmentations."""

import numpy as np
import pytest
import torch

from icd_dist.config import load_config
from icd_dist.css.classes import generic_spec
from icd_dist.data.epoch_order import micro_batches_per_epoch, train_positions
from icd_dist.data.manifest import load_manifest
from icd_dist.data.pipeline import StepLoader
from icd_dist.data.readers import RawSample
from icd_dist.data.shard_writer import build_shards
from icd_dist.train.step_worker import StepBudget
from tests.conftest import write_jpeg, write_label

NUM = 11  # not divisible by workers x micro-batch (4) nor by a global batch (8)
WORKERS, MICRO, ACCUMULATION = 2, 2, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("epochs")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(NUM):
        h, w = 40 + 3 * i, 56
        lab = rng.integers(0, 4, size=(h, w)).astype(np.uint8)
        img = rng.integers(0, 255, size=(h, w, 3)).astype(np.uint8)
        write_jpeg(root / "raw" / f"s{i:02d}.jpg", img)
        write_label(root / "raw" / f"s{i:02d}.png", lab)
        samples.append(RawSample(f"s{i:02d}", root / "raw" / f"s{i:02d}.jpg",
                                 root / "raw" / f"s{i:02d}.png"))
    build_shards(samples, generic_spec("pairs", 4), root / "shards", "train",
                 shard_size="20KB", progress=False)
    return root / "shards"


def loader(shards, kind, rank, world=WORKERS, keys=None, batches=None):
    data = load_config(None, [f"data.pipeline={kind}", "data.crop_size=32",
                              "data.loader_workers=0"]).data
    keys = keys or [s.key for s in load_manifest(shards).samples]
    per_epoch = batches or micro_batches_per_epoch(len(keys), world, MICRO, ACCUMULATION)
    return StepLoader(data, shards, keys, None, train=True, batch_size=MICRO, rank=rank,
                      world_size=world, seed=7, batches_per_epoch=per_epoch)


def test_budget_makes_whole_optimiser_steps():
    assert micro_batches_per_epoch(NUM, WORKERS, MICRO, ACCUMULATION) == 4  # 2 steps x 2
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=2",
                             "engine.micro_batch_size=2", "optim.epochs=3"])
    b = StepBudget.of(cfg, 0, NUM)
    assert (b.accumulation, b.batches_per_epoch, b.epochs, b.iterations) == (2, 4, 3, 6)
    # positions: a permutation of the whole selection first, then its start again
    pos = [train_positions(NUM, 3, 0, r, 2, 8) for r in (0, 1)]
    flat = sorted(p for part in pos for _, p in part)
    assert flat == list(range(16))
    order = [i for _, i in sorted((p, i) for part in pos for i, p in part)]
    assert sorted(order[:NUM]) == list(range(NUM)) and order[NUM:] == order[:16 - NUM]


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_epochs_cover_every_sample_with_equal_counts_per_rank(shards, kind):
    keys = sorted(s.key for s in load_manifest(shards).samples)
    loaders = [loader(shards, kind, r) for r in range(WORKERS)]
    orders = []
    for epoch in range(3):
        read = []
        for ld in loaders:
            ld.set_epoch(epoch)
            batches = list(ld)
            # every rank: the same number of full micro-batches, whole optimiser steps
            assert len(batches) == 4, (kind, epoch, len(batches))
            assert all(b.images.shape == (MICRO, 3, 32, 32) for b in batches)
            assert all(len(b.keys) == MICRO for b in batches)
            read.append([k for b in batches for k in b.keys])
        assert len(read[0]) == len(read[1]) == 8
        assert set(read[0]) | set(read[1]) == set(keys), (kind, epoch)  # all once at least
        orders.append(read)
    assert orders[0] != orders[1] != orders[2]  # a fresh permutation each epoch
    # an epoch asked for again reads the same samples with the same augmentation
    again = loaders[0]
    again.set_epoch(1)
    first = list(again)
    again.set_epoch(1)
    second = list(again)
    assert [b.keys for b in first] == [b.keys for b in second]
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
               for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_ranks_draw_different_augmentations(shards, kind):
    # one sample for two ranks: both read it, each with its own crop and flip
    key = [load_manifest(shards).samples[0].key]
    images = []
    for rank in range(2):
        ld = loader(shards, kind, rank, keys=key, batches=1)
        ld.set_epoch(0)
        images.append(torch.cat([b.images for b in ld]))
    assert images[0].shape == images[1].shape == (MICRO, 3, 32, 32)
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(images[0][0], images[0][1])  # the repeats within a rank, too


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_evaluation_reads_every_sample_once_even_with_more_ranks_than_samples(shards, kind):
    data = load_config(None, [f"data.pipeline={kind}", "data.eval_size=32",
                              "data.loader_workers=0"]).data
    keys = [s.key for s in load_manifest(shards).samples]
    for few in (keys, keys[:2]):  # 11 samples on 4 ranks; 2 samples on 4 ranks
        read = []
        for rank in range(4):
            ld = StepLoader(data, shards, few, None, train=False, batch_size=2, rank=rank,
                            world_size=4)
            read += [k for b in ld for k in b.keys]
        assert sorted(read) == sorted(few)
