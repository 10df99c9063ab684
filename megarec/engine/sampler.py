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


def grouped_epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, rank: int = 0,
                          world: int = 1, window: int = 50) -> list[np.ndarray]:
    """Length-grouped batches (the ``group_by_length`` idea of HF Trainer), resumable like
    :func:`epoch_batches`.

    The epoch's permutation (the same one :func:`epoch_batches` takes) is cut into windows
    of ``window`` global batches (``batch_size * world`` rows); each window is sorted by
    length (longest first, ties in permutation order), cut into global batches, and the
    order of all global batches is shuffled. A global batch is dealt to the ranks row by
    row, so every rank gets the same number of batches and rows of similar length: padding
    to the longest row of a batch then costs little. The order depends only on
    ``(seed, epoch)``; ``window=1`` is the random order batch by batch.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n < 1:
        raise ValueError("no training samples")
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    per_rank = math.ceil(n / world)
    total = per_rank * world
    order = np.resize(order, total)
    span = batch_size * world
    step = span * window
    for s in range(0, total, step):
        chunk = order[s:s + step]
        order[s:s + step] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    starts = np.arange(0, total, span)
    rng2 = np.random.default_rng([seed, epoch, 1])
    return [order[b:b + span][rank::world] for b in starts[rng2.permutation(len(starts))]]


def batches_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    return math.ceil(math.ceil(num_samples / world) / batch_size)


@dataclass
class EvalBatch:
    indices: np.ndarray    # [b] sample indices; rows past ``num_real`` are padding
    num_real: int


def eval_batches(num_samples: int, batch_size: int, rank: int = 0, world: int = 1,
                 lengths: np.ndarray | None = None) -> list[EvalBatch]:
    """This rank's share of an evaluation set, in batches; every rank gets the same number.

    Samples are dealt round-robin (each evaluated exactly once over all ranks); a
    rank's short or missing batches are filled with sample 0 and ``num_real`` says
    how many rows count. With ``lengths`` the samples are dealt longest first, so a
    batch holds rows of similar length (metrics are sums: the order does not change them).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = (np.arange(num_samples, dtype=np.int64) if lengths is None
             else np.argsort(-np.asarray(lengths)[:num_samples], kind="stable").astype(np.int64))
    mine = order[rank:num_samples:world]
    n_batches = max(1, batches_per_epoch(num_samples, batch_size, world)) if num_samples else 0
    out = []
    for b in range(n_batches):
        real = mine[b * batch_size:(b + 1) * batch_size]
        width = min(batch_size, max(1, math.ceil(num_samples / world) - b * batch_size))
        pad = np.zeros(max(0, width - len(real)), dtype=np.int64)
        out.append(EvalBatch(np.concatenate([real, pad]), len(real)))
    return out
