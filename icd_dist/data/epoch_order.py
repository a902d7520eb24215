"""Which samples each rank reads in an epoch: the one rule both input pipelines follow.

Training: a fresh permutation of the whole step's selection every epoch, from (seed, epoch);
repeated from its start until it fills `world * samples_per_rank` positions (as
DistributedSampler pads), rank r taking positions r, r + world, ... So every selected sample
is read at least once per epoch across the ranks, a few (fewer than one global batch) twice,
and every rank reads exactly `samples_per_rank` samples: the same number of micro-batches, and
so the same collectives, on every rank. A position, not a sample, names the augmentation, so
the repeated samples of an epoch get their own crops.

Evaluation: rank r of w takes samples r, r + w, ...: every sample exactly once, no padding
(a repeated sample would be counted twice); ranks may differ by one sample (evaluation runs
no collective per batch).
"""

from __future__ import annotations

import math

import numpy as np


def micro_batches_per_epoch(num_samples: int, world: int, micro: int, accumulation: int) -> int:
    """Micro-batches each rank runs per training epoch: whole optimiser steps, enough for
    every sample to be read once (the last global batch padded, never dropped)."""
    if num_samples <= 0:
        raise ValueError("the step selects no training sample")
    return math.ceil(num_samples / (world * micro * accumulation)) * accumulation


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of the selection (indices 0..num_samples-1) from (seed, epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_samples)


def train_positions(num_samples: int, seed: int, epoch: int, rank: int, world: int,
                    samples_per_rank: int) -> list[tuple[int, int]]:
    """(sample index, position) pairs rank `rank` reads in training epoch `epoch`, in order;
    the position (0 .. world * samples_per_rank - 1) seeds the sample's augmentation."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    order = np.resize(epoch_permutation(num_samples, seed, epoch), world * samples_per_rank)
    positions = range(rank, world * samples_per_rank, world)
    return [(int(order[p]), p) for p in positions]


def eval_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The sample indices rank `rank` evaluates: every sample once over the ranks."""
    return list(range(rank, num_samples, world))
