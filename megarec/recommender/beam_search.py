"""Trie-constrained beam search for the T5 generative recommender (TIGER Sec. 3.2, inference).

Batched over users; the encoder runs once; the decoder advances one token per
level with a KV cache (cross-attention keys/values once per user, see
:mod:`megarec.recommender.t5_decode`); at each level the only
candidates are the children of each beam's prefix in the :class:`ItemTrie`,
gathered from CSR tables, so every finished beam is a real item. A beam's
score is the sum over levels of the full-vocabulary log-softmax of its tokens
(in fp32 also for a bf16 model: the output projection upcasts the last hidden state and its weight),
the same quantity that teacher forcing gives
(:meth:`GenerativeRecommender.sequence_log_probs`) and that HF ``generate``
with ``prefix_allowed_tokens_fn``, ``length_penalty=0`` ranks by.

Written by hand rather than with HF ``generate`` because its constraint hook
is one Python call per beam per step and its cache keeps a copy of the
encoder's keys/values per beam (tools/bench_beam.py measures both).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from megarec.recommender.t5 import GenerativeRecommender
from megarec.recommender.t5_decode import GroupedBeamDecoder
from megarec.recommender.trie import ItemTrie


@torch.no_grad()
def beam_search(model: GenerativeRecommender, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                trie: ItemTrie, beam_size: int, *, soft_inputs: torch.Tensor | None = None,
                top_k: int | None = None, impl: str = "grouped") -> tuple[torch.Tensor, torch.Tensor]:
    """Top items for each history: ``(items [B, top_k] int64, scores [B, top_k])``, best first.

    ``items`` are item indices (rows of the trie's ``item_tokens``), unique per row;
    ``-1`` (score ``-inf``) fills slots when fewer valid items exist. ``top_k``
    defaults to ``beam_size``. ``impl``: ``"grouped"`` (default) decodes with
    :class:`~megarec.recommender.t5_decode.GroupedBeamDecoder` (cross-attention
    keys/values once per user); ``"hf"`` runs HF T5's forward with its
    ``EncoderDecoderCache`` (one cache row per beam; slower, kept as a reference).
    The model runs in eval mode (restored afterwards); the trie must be on the
    model's device (``trie.to(device)``). Under ZeRO-3 every rank must call this the
    same number of times (it runs the model's modules).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if trie.num_levels != model.vocab.num_levels:
        raise ValueError(f"trie has {trie.num_levels} levels, model vocabulary {model.vocab.num_levels}")
    if impl not in ("grouped", "hf"):
        raise ValueError(f"impl must be 'grouped' or 'hf', got {impl!r}")
    top_k = beam_size if top_k is None else top_k
    was_training = model.training
    model.eval()
    try:
        enc = model.encode(input_ids, attention_mask, soft_inputs=soft_inputs).last_hidden_state
        stepper = (GroupedBeamDecoder if impl == "grouped" else _HFCacheDecoder)(model.t5, enc, attention_mask)
        return _search(stepper, trie, beam_size, top_k, enc.shape[0], enc.device, model.vocab.PAD)
    finally:
        model.train(was_training)


class _HFCacheDecoder:
    """Same interface as GroupedBeamDecoder, on HF T5's forward and EncoderDecoderCache (a row per beam)."""

    def __init__(self, t5, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> None:
        self.t5, self.b = t5, encoder_hidden.shape[0]
        self.enc, self.mask = encoder_hidden, encoder_mask
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.width = 1

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=self.enc), attention_mask=self.mask,
                      decoder_input_ids=tokens.reshape(-1, 1), past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].view(self.b, tokens.shape[1], -1)

    def select(self, parent: torch.Tensor) -> None:
        rows = torch.arange(self.b, device=parent.device).unsqueeze(1)
        beam_idx = (rows * self.width + parent).view(-1)
        if parent.shape[1] != self.width:
            # the beam count changed (always after the first step): resize the cross-attention
            # cache and encoder rows too; otherwise a user's beams share identical rows.
            self.cache.reorder_cache(beam_idx)
            self.enc, self.mask = self.enc.index_select(0, beam_idx), self.mask.index_select(0, beam_idx)
        else:
            self.cache.self_attention_cache.reorder_cache(beam_idx)
        self.width = parent.shape[1]


def _search(stepper, trie: ItemTrie, beam_size: int, top_k: int, b: int, device, start_token: int):
    prefix = torch.zeros(b, 1, dtype=torch.long, device=device)     # beam state: prefix id at the current depth
    scores = torch.zeros(b, 1, dtype=torch.float32, device=device)
    tokens = torch.full((b, 1), start_token, dtype=torch.long, device=device)
    for level in range(trie.num_levels):
        width = prefix.shape[1]
        logp = stepper.step(tokens).float().log_softmax(-1)                    # [B, W, V], fp32 (fp32 logits)
        child, tok, valid = trie.children(level, prefix)                       # [B, W, F]
        cand = torch.where(valid, scores.unsqueeze(-1) + logp.gather(-1, tok), float("-inf"))
        fanout = child.shape[-1]
        scores, flat = cand.view(b, -1).topk(min(beam_size, width * fanout), dim=1)
        alive = scores > float("-inf")
        prefix = torch.where(alive, child.view(b, -1).gather(1, flat), torch.full_like(flat, -1))
        if level + 1 < trie.num_levels:
            stepper.select(torch.div(flat, fanout, rounding_mode="floor"))
            tokens = tok.view(b, -1).gather(1, flat)
    return trie.leaf_to_items(prefix, scores, top_k)
