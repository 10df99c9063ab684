"""Which sample indices each rank processes, in which order, resumable mid-epoch.

Every rank gets the same number of batches, in training and in evaluation: under
ZeRO-3 each forward is a collective, so a rank with one batch fewer hangs the
others. Training pads the epoch's permutation by wrapping around (like
``torch.utils.data.DistributedSampler``); evaluation pads with repeats that are
marked and left out of the metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[np.ndarray]:
    """This rank's batches of sample indices for ``epoch`` (same count on every rank).

    The permutation depends only on ``(seed, epoch)``, so a resumed run can skip the
    batches it already did and continue with exactly the same data.
    """
    if num_samples < 1:
        raise ValueError("no training samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = (np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle
             else np.arange(num_samples))
    per_rank = math.ceil(num_samples / world)
    total = per_rank * world
    order = np.resize(order, total)  # wraps around when num_samples is not a multiple of world
    mine = order[rank:total:world]
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def batches_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    return math.ceil(math.ceil(num_samples / world) / batch_size)


@dataclass
class EvalBatch:
    indices: np.ndarray    # [b] sample indices; rows past ``num_real`` are padding
    num_real: int


def eval_batches(num_samples: int, batch_size: int, rank: int = 0, world: int = 1) -> list[EvalBatch]:
    """This rank's share of an evaluation set, in batches; every rank gets the same number.

    Samples are dealt round-robin (each evaluated exactly once over all ranks); a
    rank's short or missing batches are filled with sample 0 and ``num_real`` says
    how many rows count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = np.arange(rank, num_samples, world, dtype=np.int64)
    n_batches = max(1, batches_per_epoch(num_samples, batch_size, world)) if num_samples else 0
    out = []
    for b in range(n_batches):
        real = mine[b * batch_size:(b + 1) * batch_size]
        width = min(batch_size, max(1, math.ceil(num_samples / world) - b * batch_size))
        pad = np.zeros(max(0, width - len(real)), dtype=np.int64)
        out.append(EvalBatch(np.concatenate([real, pad]), len(real)))
    return out
