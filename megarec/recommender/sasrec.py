"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), as RecBole builds it.

Baseline, and the teacher whose item embeddings feed ETEGRec's tokenizer and
UniGRec's collaborative distillation. PROTOCOL.md puts RecBole's SASRec next to
MegaRec's tables, so the network, loss and optimiser follow RecBole
(``recbole/model/sequential_recommender/sasrec.py`` and ``recbole/model/layers.py``):

- input: item embedding + learned absolute position embedding -> LayerNorm -> dropout;
- each layer (post-norm, BERT style), with ``hidden_dropout_prob = dropout`` and
  ``attn_dropout_prob = attn_dropout``:

  - attention: q / k / v dense -> ``q k^T / sqrt(d_head)`` + mask (causal, padding keys
    excluded) -> softmax -> attention dropout -> ``@ v`` -> dense -> dropout ->
    ``LayerNorm(out + input)``;
  - feed-forward: dense_1 -> GELU (erf form, RecBole's ``hidden_act='gelu'``) -> dense_2 ->
    dropout -> ``LayerNorm(out + input)`` (one dropout; ``nn.TransformerEncoderLayer``, used
    before, has a second one after the activation);

- init: Linear / Embedding weights ``normal(0, initializer_range=0.02)`` (the padding row
  included, as RecBole's ``_init_weights`` overwrites it), Linear biases 0, LayerNorm 1 / 0;
- output: the last layer's state at the last real item; scores = dot products with the
  tied item embeddings;
- loss: full-softmax cross-entropy over RecBole's logits, which span the whole embedding
  table *including the padding row 0* (RecBole's ``n_items`` counts ``[PAD]``); the
  padding row is left out of :meth:`SASRec.scores` (RecBole sets it to ``-inf`` before
  ranking);
- optimiser (``train_rec.py`` profiles): Adam, lr 1e-3, no weight decay, no gradient
  clipping (RecBole's ``clip_grad_norm`` is off by default): AdamW with weight decay 0 is
  Adam; clipping is turned off through ``resolve_ds_config(..., grad_clip=0)``.

Differences that remain (none changes the maths of a real position):

- RecBole right-pads histories; here they may be padded on either side: positions
  count from the first real item, which is RecBole's numbering of the right-padded row;
- masked keys get the dtype's most negative value instead of RecBole's additive
  ``-10000``: both give masked keys weight exactly 0 in fp32 (``exp(-10000)``
  underflows); only rows that have no visible key at all differ (left-padding query
  positions, whose outputs nothing reads): uniform weights here as in RecBole;
- the attention softmax, the output projection and the loss are computed in fp32 when
  the model runs in bf16 (RecBole runs fp32 throughout, so in fp32 nothing differs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megarec.config import ConfigError, field


@dataclass
class SASRecConfig:
    hidden: int = field(64, min=1, help="hidden size (item embedding width)")
    num_layers: int = field(2, min=1)
    num_heads: int = field(2, min=1)
    inner: int = field(256, min=1, help="feed-forward width")
    dropout: float = field(0.5, min=0.0, max=1.0, help="dropout on embeddings and after each sub-layer's output "
                                                        "dense (RecBole hidden_dropout_prob)")
    attn_dropout: float | None = field(None, min=0.0, max=1.0, help="dropout on attention weights (RecBole "
                                                                    "attn_dropout_prob; none = dropout)")
    max_len: int = field(50, min=1, help="longest history (learned positions)")
    layer_norm_eps: float = field(1e-12, min=0.0)
    init_std: float = field(0.02, min=0.0, help="normal init std (RecBole initializer_range)")

    def check(self) -> None:
        if self.hidden % self.num_heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout


class SelfAttention(nn.Module):
    """RecBole's ``MultiHeadAttention``: post-norm multi-head self-attention with its residual."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden // cfg.num_heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)        # [B, H, T, d]

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x [B, T, h]``; ``allowed [B, 1, T, T]`` (query, key) pairs that may attend."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(scores.softmax(-1).to(v.dtype))
        ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
        return self.norm(self.out_dropout(self.dense(ctx)) + x)


class FeedForward(nn.Module):
    """RecBole's ``FeedForward``: dense -> GELU -> dense -> dropout -> ``LayerNorm(out + input)``."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.dense_1 = nn.Linear(cfg.hidden, cfg.inner)
        self.dense_2 = nn.Linear(cfg.inner, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.dense_2(F.gelu(self.dense_1(x)))) + x)


class TransformerLayer(nn.Module):
    """RecBole's ``TransformerLayer``: self-attention block, then feed-forward block."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attention(x, allowed))


class SASRec(nn.Module):
    """Causal self-attention over item histories (RecBole's SASRec; see the module docstring).

    A history is ``[B, T]`` of item index + 1 with 0 = padding, oldest item first,
    padded on the left or the right (both work: positions count from the first
    real item and the state is read at the last real item). ``T <= cfg.max_len``.
    """

    def __init__(self, num_items: int, cfg: SASRecConfig | None = None) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.cfg = cfg = cfg or SASRecConfig()
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def hidden_states(self, history: torch.Tensor) -> torch.Tensor:
        """Per-position states ``[B, T, h]``; position t sees real items 0..t only."""
        if history.dim() != 2 or history.shape[1] > self.cfg.max_len:
            raise ValueError(f"history must be [B, T<={self.cfg.max_len}], got {tuple(history.shape)}")
        valid = history > 0
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        x = self.drop(self.norm(self.item_emb(history) + self.pos_emb(pos)))
        t = history.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=history.device).tril()
        allowed = (causal & valid[:, None, :]).unsqueeze(1)                  # [B, 1, T(query), T(key)]
        for layer in self.layers:
            x = layer(x, allowed)
        return x

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """State at each row's last real item: ``[B, h]`` (rows need at least one item)."""
        states = self.hidden_states(history)
        valid = history > 0
        if not bool(valid.any(1).all()):
            raise ValueError("every history needs at least one item")
        t = history.shape[1]
        last = (valid.long() * torch.arange(1, t + 1, device=history.device)).argmax(1)
        return states[torch.arange(len(history), device=history.device), last]

    def item_embeddings(self) -> torch.Tensor:
        """Item embeddings ``[num_items, h]`` (row i = item index i; padding row dropped)."""
        return self.item_emb.weight[1:]

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        """RecBole's logits ``[B, num_items + 1]`` in fp32: column 0 is the padding row, column
        ``i + 1`` item ``i``. State and embeddings are upcast before the product, so a bf16
        model ranks without bf16 rounding of the scores."""
        return self(history).float() @ self.item_emb.weight.float().T

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Full-catalogue scores ``[B, num_items]`` in fp32 (dot products with the tied item embeddings)."""
        return self.logits(history)[:, 1:]

    def loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item (``target [B]``: item index, 0-based), over
        RecBole's logits: the padding row is one of the classes, as in RecBole."""
        return F.cross_entropy(self.logits(history), target + 1)


def pad_histories(histories: Sequence, max_len: int, *, left: bool = True) -> torch.Tensor:
    """Item-index histories (oldest first) -> ``[B, max_len]`` of index + 1, 0-padded, last ``max_len`` kept."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = torch.as_tensor(h, dtype=torch.long).reshape(-1)
        h = h[len(h) - min(len(h), max_len):] + 1
        if left:
            out[i, max_len - len(h):] = h
        else:
            out[i, :len(h)] = h
    return out


def export_item_embeddings(model: SASRec, item_keys: Sequence[str], path: str | Path) -> None:
    """Write the model's item embeddings (row i = ``item_keys[i]``) as a
    :mod:`megarec.data.embeddings` file with ``source="sasrec"`` (input of ETEGRec's
    tokenizer and UniGRec's distillation)."""
    from megarec.data.embeddings import save_item_embeddings

    if len(item_keys) != model.num_items:
        raise ValueError(f"{len(item_keys)} item keys for a model over {model.num_items} items")
    save_item_embeddings(path, model.item_embeddings().detach(), item_keys, source="sasrec")
