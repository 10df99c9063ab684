"""Recall@K / NDCG@K against hand-computed values, and across 2 ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megarec.recommender.metrics import RankingMetrics, target_ranks
from tests.dist import run_ranks


def _naive_rank(row: list[int], target: int) -> int:
    """Deduplicate (first occurrence wins), drop -1, 1-based position of the target, 0 if absent."""
    seen: list[int] = []
    for x in row:
        if x >= 0 and x not in seen:
            seen.append(x)
    return seen.index(target) + 1 if target in seen else 0


def test_hand_computed_values():
    ranked = torch.tensor([
        [7, 3, 9, 1, 2, 4, 5, 6],        # target 7 at rank 1
        [3, 3, 3, 9, 2, -1, -1, -1],     # duplicates: target 9 at rank 2
        [-1, 5, 6, 1, 2, 3, 4, 8],       # -1 slot skipped: target 8 at rank 7
        [1, 2, 3, 4, 5, 6, 7, 8],        # target 0 absent
        [-1, -1, -1, -1, -1, -1, -1, -1],  # empty list
        [1, 2, 3, 4, 5, 6, 7, 0],        # target 0 at rank 8 (beyond 5, within 10)
    ])
    targets = torch.tensor([7, 9, 8, 0, 3, 0])
    assert target_ranks(ranked, targets).tolist() == [1, 2, 7, 0, 0, 8]
    m = RankingMetrics((5, 10))
    m.update(ranked[:2], targets[:2])     # two batches: sums, not a mean of batch means
    m.update(ranked[2:], targets[2:])
    out = m.compute()
    assert out["count"] == 6
    assert out["recall@5"] == pytest.approx(2 / 6)
    assert out["recall@10"] == pytest.approx(4 / 6)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 6)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(8) + 1 / math.log2(9)) / 6)


def test_ranks_match_naive_on_random_lists():
    rng = np.random.default_rng(0)
    ranked = rng.integers(-1, 12, size=(200, 15))
    targets = rng.integers(0, 12, size=200)
    got = target_ranks(torch.from_numpy(ranked), torch.from_numpy(targets)).tolist()
    assert got == [_naive_rank(list(r), int(t)) for r, t in zip(ranked, targets)]


def test_bad_inputs():
    m = RankingMetrics()
    with pytest.raises(ValueError, match="no users"):
        m.compute()
    with pytest.raises(ValueError, match=r"\[B, R\]"):
        m.update(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        RankingMetrics((0, 5))


def _dataset(seed: int = 0, n: int = 37):
    rng = np.random.default_rng(seed)
    ranked = rng.integers(-1, 30, size=(n, 12))
    targets = rng.integers(0, 30, size=n)
    targets[::3] = ranked[::3, 2]         # make some hits at low ranks
    return torch.from_numpy(ranked), torch.from_numpy(targets)


def _rank_fn(rank: int, world: int) -> tuple[dict, dict]:
    ranked, targets = _dataset()
    # uneven split: rank 0 gets 5 users in 2 batches, rank 1 the other 32 in 1 batch
    m = RankingMetrics((1, 5, 10))
    if rank == 0:
        m.update(ranked[:2], targets[:2])
        m.update(ranked[2:5], targets[2:5])
    else:
        m.update(ranked[5:], targets[5:])
    uneven = m.compute()
    ranked, targets = _dataset(seed=1, n=9)
    m = RankingMetrics((5,))
    if rank == 1:                          # rank 0 saw nobody but still joins the all-reduce
        m.update(ranked, targets)
    return uneven, m.compute()


def test_two_ranks_equal_single_process():
    ranked, targets = _dataset()
    single = RankingMetrics((1, 5, 10))
    single.update(ranked, targets)
    want = single.compute()
    assert want["count"] == 37 and 0 < want["recall@10"] < 1
    ranked, targets = _dataset(seed=1, n=9)
    single_empty = RankingMetrics((5,))
    single_empty.update(ranked, targets)
    for got, got_empty in run_ranks(_rank_fn, world_size=2):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12), k
        assert got_empty == pytest.approx(single_empty.compute())
