"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), RecBole-style.

Baseline, and the teacher whose item embeddings feed ETEGRec's tokenizer and
UniGRec's collaborative distillation. Item embedding + learned position
embedding -> LayerNorm -> dropout -> causal Transformer (post-norm, GELU) ->
state at the last real position; scores are dot products with the (tied) item
embeddings over the full catalogue, trained with full-softmax cross-entropy
(PROTOCOL.md: RecBole SASRec, CE loss).
"""
from __future__ import annotations

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
    dropout: float = field(0.5, min=0.0, max=1.0, help="dropout on embeddings, attention and feed-forward")
    max_len: int = field(50, min=1, help="longest history (learned positions)")
    layer_norm_eps: float = field(1e-12, min=0.0)
    init_std: float = field(0.02, min=0.0, help="normal init std (RecBole initializer_range)")

    def check(self) -> None:
        if self.hidden % self.num_heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")


class SASRec(nn.Module):
    """Causal self-attention over item histories.

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
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.num_heads, cfg.inner, cfg.dropout, activation="gelu",
                                           layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=self.cfg.init_std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def hidden_states(self, history: torch.Tensor) -> torch.Tensor:
        """Per-position states ``[B, T, h]``; position t sees items 0..t only."""
        if history.dim() != 2 or history.shape[1] > self.cfg.max_len:
            raise ValueError(f"history must be [B, T<={self.cfg.max_len}], got {tuple(history.shape)}")
        valid = history > 0
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        x = self.drop(self.norm(self.item_emb(history) + self.pos_emb(pos)))
        t = history.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=history.device).tril()
        # allowed[b, q, k]: causal and key is a real item; every query may see itself so a
        # left-padding row is never fully masked (fully masked rows give NaN that leaks).
        allowed = causal & valid[:, None, :] | torch.eye(t, dtype=torch.bool, device=history.device)
        mask = ~allowed.repeat_interleave(self.cfg.num_heads, dim=0)
        return self.encoder(x, mask=mask)

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

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Full-catalogue scores ``[B, num_items]`` (dot product with tied item embeddings)."""
        return self(history) @ self.item_embeddings().T

    def loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item; ``target [B]`` is the item index (0-based)."""
        return F.cross_entropy(self.scores(history), target)


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
