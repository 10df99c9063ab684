"""Incremental T5 decoding for beam search, beams grouped per user.

Written by hand (on HF T5's own modules and weights) because HF's cache layout
is one row per beam: its cross-attention keys/values are copied for every beam
of a user and re-indexed at each step, which costs more than the decoder itself
at beam 20-50. Here the cross-attention keys/values are computed once per user
(``[B, H, T, d_kv]``) and the beams of a user attend to them as a block of
queries (``[B, H, W, d_kv]``); only the small self-attention cache (one
position per generated token) follows the beams. The maths is T5's decoder
(pre-norm blocks, unscaled dot products plus relative position bias in
self-attention, no bias in cross-attention, residual feed-forward) and
``tests/test_recommender_beam.py`` checks it against HF's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration


class GroupedBeamDecoder:
    """Decode B users x W beams one token at a time.

    ``encoder_hidden [B, T, d]`` and ``encoder_mask [B, T]`` are the encoder's output
    for each user; :meth:`step` feeds the next token of every beam, :meth:`select`
    keeps/reorders/duplicates beams (the width may change between steps).
    """

    def __init__(self, t5: T5ForConditionalGeneration, encoder_hidden: torch.Tensor,
                 encoder_mask: torch.Tensor) -> None:
        self.t5 = t5
        self.decoder = t5.get_decoder()
        cfg = t5.config
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.scale_out = cfg.d_model ** -0.5 if cfg.scale_decoder_outputs else None
        b, t, _ = encoder_hidden.shape
        self.b = b
        self.cross_k, self.cross_v = [], []
        for block in self.decoder.block:
            attn = block.layer[1].EncDecAttention
            self.cross_k.append(attn.k(encoder_hidden).view(b, t, self.heads, self.d_kv).transpose(1, 2))
            self.cross_v.append(attn.v(encoder_hidden).view(b, t, self.heads, self.d_kv).transpose(1, 2))
        neg = torch.finfo(encoder_hidden.dtype).min
        self.cross_bias = torch.zeros(b, 1, 1, t, dtype=encoder_hidden.dtype, device=encoder_hidden.device)
        self.cross_bias.masked_fill_(~encoder_mask.bool().view(b, 1, 1, t), neg)
        self.self_k: list[torch.Tensor] = []       # per layer [B, W, H, steps, d_kv]
        self.self_v: list[torch.Tensor] = []

    @property
    def steps(self) -> int:
        return self.self_k[0].shape[3] if self.self_k else 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, W]`` -> next-token logits ``[B, W, V]`` in fp32 (the beams' caches grow by one)."""
        b, w = tokens.shape
        h, dk, past = self.heads, self.d_kv, self.steps
        x = self.decoder.embed_tokens(tokens)                                   # [B, W, d]
        bias = None
        for i, block in enumerate(self.decoder.block):
            sa, ca = block.layer[0], block.layer[1]
            attn = sa.SelfAttention
            y = sa.layer_norm(x)
            q = attn.q(y).view(b * w, h, 1, dk)
            k = attn.k(y).view(b, w, h, 1, dk)
            v = attn.v(y).view(b, w, h, 1, dk)
            if past:
                k = torch.cat([self.self_k[i], k], dim=3)
                v = torch.cat([self.self_v[i], v], dim=3)
                self.self_k[i], self.self_v[i] = k, v
            else:
                self.self_k.append(k)
                self.self_v.append(v)
            if bias is None:   # the first block's relative position bias serves every block (as in HF)
                bias = attn.compute_bias(1, past + 1, device=x.device, past_seen_tokens=past).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k.view(b * w, h, past + 1, dk), v.view(b * w, h, past + 1, dk),
                                                 attn_mask=bias, scale=1.0)
            x = x + attn.o(out.view(b, w, h * dk))
            cross = ca.EncDecAttention
            q = cross.q(ca.layer_norm(x)).view(b, w, h, dk).transpose(1, 2)      # [B, H, W, d_kv]
            out = F.scaled_dot_product_attention(q, self.cross_k[i], self.cross_v[i], attn_mask=self.cross_bias,
                                                 scale=1.0)
            x = x + cross.o(out.transpose(1, 2).reshape(b, w, h * dk))
            x = block.layer[-1](x)                                               # feed-forward + residual
        x = self.decoder.final_layer_norm(x).float()     # fp32 from here: no bf16 ties in the logits
        if self.scale_out is not None:
            x = x * self.scale_out
        return self.t5.lm_head(x)                         # FP32OutputProjection: fp32 logits

    def select(self, parent: torch.Tensor) -> None:
        """Keep beams ``parent [B, W']`` (indices into each user's current beams)."""
        rows = torch.arange(self.b, device=parent.device).unsqueeze(1)
        self.self_k = [k[rows, parent] for k in self.self_k]
        self.self_v = [v[rows, parent] for v in self.self_v]
