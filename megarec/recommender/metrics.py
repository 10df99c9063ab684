"""Full-ranking Recall@K and NDCG@K, leave-one-out (PROTOCOL.md).

One target per user. The ranked list is what the model returns (the beam for
generative models, the top-R of full scores for SASRec); ``-1`` marks an empty
slot, and a repeated item counts only at its first position (duplicates are
removed, later items move up). A target outside the list is a miss.

    Recall@K = 1[rank <= K]        NDCG@K = 1[rank <= K] / log2(rank + 1)   (rank 1-based)

averaged over all users of every batch and every rank: the accumulator keeps
sums and a count, all-reduced in :meth:`RankingMetrics.compute`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megarec.distributed import all_reduce_sum


def target_ranks(ranked_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target in its deduplicated list, 0 when absent: ``[B]`` int64.

    Vectorised: a stable sort finds each item's first occurrence, and the rank is the
    number of distinct valid items up to and including the target's first position.
    """
    if ranked_items.dim() != 2 or targets.shape != ranked_items.shape[:1]:
        raise ValueError(f"ranked_items must be [B, R] and targets [B], got {tuple(ranked_items.shape)} "
                         f"and {tuple(targets.shape)}")
    ranked = ranked_items.long()
    if ranked.shape[1] == 0:
        return torch.zeros(len(ranked), dtype=torch.long, device=ranked.device)
    vals, order = ranked.sort(dim=1, stable=True)
    first_sorted = torch.ones_like(vals, dtype=torch.bool)
    first_sorted[:, 1:] = vals[:, 1:] != vals[:, :-1]
    first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)
    new = first & (ranked >= 0)
    prefix = new.long().cumsum(1)
    hit = (ranked == targets.long().unsqueeze(1)) & new       # at most one True per row
    return (prefix * hit).sum(1)


class RankingMetrics:
    """Accumulates Recall@K / NDCG@K over batches; ``compute()`` all-reduces across ranks.

    ``compute`` is a collective when distributed: every rank must call it, even a
    rank that saw no users.
    """

    def __init__(self, ks: Sequence[int] = (5, 10)) -> None:
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive ints, got {ks}")
        self.ks = ks
        self.reset()

    def reset(self) -> None:
        # [count, hit@k..., ndcg@k...]; float64 so sums over millions of users stay exact.
        self._sums: torch.Tensor | None = None

    def update(self, ranked_items: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``ranked_items [B, R]`` int64 (best first, -1 = empty) and ``targets [B]``."""
        rank = target_ranks(ranked_items, targets.to(ranked_items.device))
        r = rank.double()
        hit = [(rank > 0) & (rank <= k) for k in self.ks]
        gain = torch.where(rank > 0, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
        row = torch.stack([torch.tensor(float(len(rank)), dtype=torch.float64, device=rank.device)]
                          + [h.double().sum() for h in hit]
                          + [(gain * h).sum() for h in hit])
        self._sums = row if self._sums is None else self._sums + row.to(self._sums.device)

    def compute(self, device: torch.device | str | None = None) -> dict[str, float]:
        """``{"recall@5": .., "ndcg@5": .., ..., "count": n}`` over all users of all ranks.

        ``device`` is where the all-reduce happens (the backend's device: CPU for gloo,
        the rank's GPU for nccl); default: where the updates were, else CPU.
        """
        n = 1 + 2 * len(self.ks)
        if device is None:
            device = self._sums.device if self._sums is not None else "cpu"
        sums = (self._sums if self._sums is not None else torch.zeros(n, dtype=torch.float64)).to(device).clone()
        sums = all_reduce_sum(sums).cpu().tolist()
        count = sums[0]
        if count == 0:
            raise ValueError("no users were evaluated on any rank")
        out: dict[str, float] = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = sums[1 + i] / count
            out[f"ndcg@{k}"] = sums[1 + len(self.ks) + i] / count
        out["count"] = int(count)
        return out
