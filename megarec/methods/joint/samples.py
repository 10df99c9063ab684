"""The joint methods' samples over live codes, and the codes themselves: every item's collision-free
codes from the current tokenizer and the statistics of a regeneration.

Codes change after every tokenizer epoch, so samples keep item indices and look up each
item's tokens at batch time from the model's ``item_codes`` buffer: a regeneration (or a
checkpoint load) applies at once, with no re-encoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from megarec.data.code_vocab import EOS, PAD, CodeVocab
from megarec.data.splits import Samples
from megarec.tokenizer.assign import CollisionError, assign_catalogue, collision_rate, level_stats
from megarec.tokenizer.rqvae import RQVAE
from megarec.tokenizer.zero import broadcast_
from megarec.methods.joint.config import JointCodesConfig


# --------------------------------------------------------------------------- samples
class CodeTable:
    """Item index -> token ids ``[N, L]`` from the model's current codes (read at every batch)."""

    def __init__(self, vocab: CodeVocab, codes: torch.Tensor) -> None:
        self.vocab = vocab
        self.offsets = torch.as_tensor(vocab.offsets, dtype=torch.long)
        self.codes = codes                    # before the model exists
        self.model: Any = None                # the joint model once built: its item_codes buffer is read

    def tokens(self, device: torch.device | str) -> torch.Tensor:
        codes = self.model.item_codes if self.model is not None else self.codes
        return codes.to(device) + self.offsets.to(device)


@dataclass
class HistorySamples:
    """(history, target) pairs as global item indices; tokens are looked up per batch, so
    regenerated codes apply at once. Rows: items oldest first, right-padded with -1."""

    items: torch.Tensor       # [n, max_len] int64
    counts: np.ndarray        # [n] items per history
    targets: torch.Tensor     # [n]
    table: CodeTable

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def lengths(self) -> np.ndarray:
        """Encoder tokens per row (L per item + EOS)."""
        return self.counts * self.table.vocab.num_levels + 1

    def batch(self, indices: np.ndarray | Sequence[int], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Encoder ids as :meth:`CodeVocab.encode_histories` writes them (codes, EOS, PAD), labels, targets."""
        idx = np.asarray(indices, dtype=np.int64)
        width = int(self.counts[idx].max())
        t = torch.from_numpy(idx)
        items = self.items.index_select(0, t)[:, :width].to(device, non_blocking=True)
        targets = self.targets.index_select(0, t).to(device, non_blocking=True)
        tokens = self.table.tokens(device)
        L = tokens.shape[1]
        valid = items >= 0
        ids = torch.where(valid[..., None], tokens[items.clamp(min=0)], PAD).reshape(len(idx), width * L)
        ids = torch.cat([ids, ids.new_full((len(idx), 1), PAD)], dim=1)
        ids.scatter_(1, valid.sum(1, keepdim=True) * L, EOS)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": tokens[targets],
                "targets": targets}


def history_samples(samples: Samples, offset: int, max_len: int, table: CodeTable) -> HistorySamples:
    hist = [np.asarray(h, dtype=np.int64)[-max_len:] + offset for h in samples.histories]
    counts = np.array([len(h) for h in hist], dtype=np.int64)
    items = torch.full((len(hist), max(1, int(counts.max(initial=1)))), -1, dtype=torch.long)
    for i, h in enumerate(hist):
        items[i, :len(h)] = torch.from_numpy(h)
    return HistorySamples(items, counts, torch.from_numpy(np.asarray(samples.targets, dtype=np.int64) + offset),
                          table)


def concat_history_samples(parts: Sequence[HistorySamples]) -> HistorySamples:
    width = max(p.items.shape[1] for p in parts)
    items = torch.cat([torch.nn.functional.pad(p.items, (0, width - p.items.shape[1]), value=-1) for p in parts])
    return HistorySamples(items, np.concatenate([p.counts for p in parts]), torch.cat([p.targets for p in parts]),
                          parts[0].table)


# --------------------------------------------------------------------------- codes
def vocab_sizes(tokenizer: RQVAE, s: JointCodesConfig) -> list[int]:
    """Code levels of the recommender's vocabulary: the RQ-VAE's, plus the fixed dedup level."""
    return list(tokenizer.codebook_sizes) + ([s.collision_codes] if s.collisions == "dedup" else [])


@torch.no_grad()
def item_codes(tokenizer: RQVAE, item_emb: torch.Tensor, item_keys: Sequence[str], s: JointCodesConfig,
               previous: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Every item's collision-free codes ``[N, L']`` under ``s.collisions`` (a collective under
    ZeRO-3: call on every rank), identical on every rank (rank 0's are broadcast). ``previous``: the
    codes being replaced (a regeneration): an item whose prefix is unchanged keeps its dedup token."""
    was = tokenizer.training
    tokenizer.eval()
    try:
        cf = assign_catalogue(tokenizer, item_emb, list(item_keys), s.collisions, batch_size=s.codes_batch_size,
                              device=item_emb.device, previous=None if previous is None else previous.cpu().numpy())
    finally:
        tokenizer.train(was)
    if s.collisions == "dedup" and cf.codebook_sizes[-1] > s.collision_codes:
        raise CollisionError(f"{cf.codebook_sizes[-1]} items share one ID (dedup tokens needed) but "
                             f"{s.section}.collision_codes is "
                             f"{s.collision_codes}: raise it or use {s.section}.collisions: utgrec")
    codes = broadcast_(torch.from_numpy(cf.codes).to(item_emb.device))
    return codes, cf.stats


def code_stats(old: torch.Tensor, new: torch.Tensor, sizes: Sequence[int], stats: dict[str, Any]
               ) -> dict[str, float]:
    """``codebook/*`` scalars after a regeneration: per-level usage and perplexity (before the
    collision level), collision rate before resolution, and the code change rate."""
    n_rq = len(stats["levels_before"])
    out = {"collision_rate": float(stats["collision_rate_before"]),
           "change_rate": float((old != new).any(1).float().mean()),
           "collision_rate_after": collision_rate(new.cpu().numpy())}
    for level, st in enumerate(level_stats(new.cpu().numpy()[:, :n_rq], sizes[:n_rq])):
        out[f"usage_l{level + 1}"] = st["usage"]
        out[f"perplexity_l{level + 1}"] = st["perplexity"]
        out[f"change_rate_l{level + 1}"] = float((old[:, level] != new[:, level]).float().mean())
    return out
