"""A trained generative recommender for ``megarec recommend``: histories -> top-K items by trie-constrained
beam search over the candidates' codes (TIGER, UTGRec, ETEGRec and UniGRec load their T5 into it)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megarec.recommender.beam_search import beam_search
from megarec.recommender.t5 import GenerativeRecommender
from megarec.recommender.trie import ItemTrie


class BeamRecommender:
    """``recommend(histories, k)``: global item indices ``[B, k]`` (-1 = none) and sequence log-probabilities."""

    def __init__(self, model: GenerativeRecommender, data_items: np.ndarray, item_tokens: np.ndarray,
                 max_len: int, beam_size: int) -> None:
        self.model = model.eval()
        self.vocab = model.vocab
        self.item_tokens = item_tokens          # [N, L] tokens of every item of the domains, global order
        self.max_len, self.beam_size = max_len, beam_size
        self.trie = ItemTrie(item_tokens[data_items], vocab=self.vocab)
        self.candidates = torch.from_numpy(np.asarray(data_items, dtype=np.int64))

    @torch.no_grad()
    def recommend(self, histories: Sequence[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.vocab.encode_histories(histories, self.item_tokens, max_items=self.max_len)
        items, scores = beam_search(self.model, ids, mask, self.trie, max(self.beam_size, k), top_k=k)
        glob = torch.where(items >= 0, self.candidates[items.clamp(min=0)], items)
        return glob, scores
