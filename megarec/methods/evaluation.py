"""The evaluation loop every recommender method shares (PROTOCOL.md).

A method supplies ``rank_batch(domain, batch) -> ranked [B, R]`` (global item indices,
``-1`` for empty slots); this loop walks each domain's users in rank-sharded, padded
batches (every rank runs the same number of forward passes, as ZeRO-3 requires) and
accumulates Recall/NDCG@K pooled over all users and, with several domains, per domain.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from megarec.distributed import get_rank, get_world_size
from megarec.engine.sampler import eval_batches
from megarec.recommender.beam_search import beam_search
from megarec.recommender.metrics import RankingMetrics
from megarec.recommender.trie import ItemTrie


def evaluate_domains(per_domain: Sequence, domain_names: Sequence[str],
                     rank_batch: Callable[[int, dict[str, torch.Tensor]], torch.Tensor], batch_size: int,
                     device: torch.device | str, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Pooled metrics plus ``"<domain>/<metric>"`` when there are several domains.

    ``per_domain[d]`` has ``len()`` and ``.batch(indices, device)`` returning a dict with
    ``"targets"`` (global item indices) and whatever ``rank_batch`` reads.
    """
    rank, world = get_rank(), get_world_size()
    several = len(per_domain) > 1
    pooled = RankingMetrics(ks)
    out: dict[str, float] = {}
    for d, samples in enumerate(per_domain):
        if len(samples) == 0:
            continue
        own = RankingMetrics(ks) if several else None
        for eb in eval_batches(len(samples), batch_size, rank, world, getattr(samples, "lengths", None)):
            b = samples.batch(eb.indices, device)
            ranked = rank_batch(d, b)[: eb.num_real]
            targets = b["targets"][: eb.num_real]
            pooled.update(ranked, targets)
            if own is not None:
                own.update(ranked, targets)
        if own is not None:
            out.update({f"{domain_names[d]}/{k}": v for k, v in own.compute(device).items()})
    out.update(pooled.compute(device))
    return out


@torch.no_grad()
def evaluate_beam(t5: torch.nn.Module, tries: Sequence[ItemTrie], offsets: Sequence[int], per_domain: Sequence,
                  domain_names: Sequence[str], beam_size: int, batch_size: int, device: torch.device | str,
                  ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall/NDCG@K of a generative recommender: trie-constrained beam search over each domain's items
    (``tries[d]`` holds domain ``d``'s items, local indices; ``offsets[d]`` makes them global)."""
    from megarec.config import ConfigError

    if beam_size < max(ks):
        raise ConfigError(f"beam_size ({beam_size}) must be >= the largest K ({max(ks)})")

    def rank_batch(d: int, b: dict[str, torch.Tensor]) -> torch.Tensor:
        items, _ = beam_search(t5, b["input_ids"], b["attention_mask"], tries[d], beam_size)
        return torch.where(items >= 0, items + int(offsets[d]), items)

    return evaluate_domains(per_domain, domain_names, rank_batch, batch_size, device, ks)
