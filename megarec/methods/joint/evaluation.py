"""Evaluation of a joint model on its current codes: the tries are rebuilt from the model's ``item_codes``
at every call, so regenerated or reloaded codes apply."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megarec.methods.evaluation import evaluate_beam
from megarec.recommender.trie import ItemTrie


@torch.no_grad()
def evaluate_on_codes(model: Any, data: Any, per_domain: Sequence, beam_size: int, batch_size: int,
                      device: torch.device | str, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall/NDCG@K by trie-constrained beam search of ``model.recommender`` over each domain's items
    (``data``: ``multi``, ``table`` and ``vocab`` of the method's data)."""
    tokens = (model.item_codes.cpu() + data.table.offsets).numpy()
    tries = [ItemTrie(tokens[data.multi.domain_items(d)], vocab=data.vocab).to(device)
             for d in range(len(data.multi.domains))]
    return evaluate_beam(model.recommender, tries, data.multi.offsets, per_domain, data.multi.names, beam_size,
                         batch_size, device, ks)
