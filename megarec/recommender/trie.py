"""Prefix trie over the catalogue's token sequences, stored as one CSR array per level.

A prefix of length l (l = 0 .. L) has an id at its depth; the prefixes of
length l + 1 are numbered in lexicographic order, so the children of prefix p
at depth l are the contiguous ids ``indptr[l][p] .. indptr[l][p + 1] - 1`` and
``child_token[l][c]`` is the token that child c adds. A beam step therefore
needs only gathers: no Python call per beam, whatever L and codebook sizes.
Full sequences (depth L) map to items through a second CSR
(``leaf_ptr``/``leaf_items``): several items share a leaf when their codes
collide (without TIGER's dedup level), and all of them are returned, in item
order, with the leaf's score.
"""
from __future__ import annotations

import numpy as np
import torch

from megarec.data.code_vocab import CodeVocab
from megarec.data.domain import DataError


class ItemTrie:
    """Trie of ``item_tokens [N, L]`` (token ids from :meth:`CodeVocab.item_tokens`)."""

    def __init__(self, item_tokens: np.ndarray, num_levels: int | None = None, vocab: CodeVocab | None = None) -> None:
        tokens = np.asarray(item_tokens, dtype=np.int64)
        if tokens.ndim != 2 or len(tokens) == 0:
            raise DataError(f"item tokens must be a non-empty [num_items, levels] array, got shape {tokens.shape}")
        n, levels = tokens.shape
        if num_levels is not None and levels != num_levels:
            raise DataError(f"item tokens have {levels} levels, expected {num_levels}")
        if vocab is not None:
            if levels != vocab.num_levels:
                raise DataError(f"item tokens have {levels} levels but the vocabulary has {vocab.num_levels}")
            vocab.token_codes(tokens)  # every token must belong to its level
        self.num_items, self.num_levels = n, levels
        order = np.lexsort(tokens.T[::-1])           # rows sorted lexicographically, ties by item index
        rows = tokens[order]
        change = np.ones((n, levels), dtype=bool)     # change[i, l]: row i starts a new prefix of length l + 1
        change[1:] = np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1)
        self.indptr: list[torch.Tensor] = []
        self.child_token: list[torch.Tensor] = []
        self.max_fanout: list[int] = []
        parent = np.zeros(n, dtype=np.int64)          # prefix id of length l for each sorted row
        for level in range(levels):
            starts = change[:, level]
            child_parent = parent[starts]
            counts = np.bincount(child_parent, minlength=int(parent[-1]) + 1)
            self.indptr.append(torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])))
            self.child_token.append(torch.from_numpy(rows[starts, level].copy()))
            self.max_fanout.append(int(counts.max()))
            parent = np.cumsum(starts) - 1
        leaf_counts = np.bincount(parent)
        self.num_leaves = len(leaf_counts)
        self.leaf_ptr = torch.from_numpy(np.concatenate([[0], np.cumsum(leaf_counts)]))
        self.leaf_items = torch.from_numpy(order.astype(np.int64))
        self.max_leaf_items = int(leaf_counts.max())
        self.num_colliding_items = int(leaf_counts[leaf_counts > 1].sum())

    @classmethod
    def from_codes(cls, codes: np.ndarray, vocab: CodeVocab) -> "ItemTrie":
        """Trie from raw codes ``[N, L]`` (converted with ``vocab.item_tokens``)."""
        return cls(vocab.item_tokens(codes), vocab.num_levels, vocab)

    def to(self, device: torch.device | str) -> "ItemTrie":
        """Move the tables to ``device`` (in place; returns self)."""
        self.indptr = [t.to(device) for t in self.indptr]
        self.child_token = [t.to(device) for t in self.child_token]
        self.leaf_ptr, self.leaf_items = self.leaf_ptr.to(device), self.leaf_items.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.leaf_items.device

    def children(self, level: int, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Children of prefixes ``[...]`` at depth ``level`` padded to the level's max fan-out F.

        Returns ``(child_ids [..., F], tokens [..., F], valid [..., F])``; padded slots have
        ``valid = False`` and a clamped (meaningless) id/token. A negative prefix has no children.
        """
        indptr, tok = self.indptr[level], self.child_token[level]
        p = prefix.clamp(min=0)
        start, end = indptr[p], indptr[p + 1]
        j = torch.arange(self.max_fanout[level], device=prefix.device)
        child = start.unsqueeze(-1) + j
        valid = (child < end.unsqueeze(-1)) & (prefix >= 0).unsqueeze(-1)
        child = child.clamp(max=len(tok) - 1)
        return child, tok[child], valid

    def prefix_id(self, tokens: torch.Tensor) -> torch.Tensor:
        """Walk token rows ``[B, l]`` down the trie -> prefix id at depth l, -1 where no item has that prefix."""
        node = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        for level in range(tokens.shape[1]):
            child, tok, valid = self.children(level, node)
            match = valid & (tok == tokens[:, level:level + 1])
            node = torch.where(match.any(-1), (child * match).sum(-1), torch.full_like(node, -1))
        return node

    def leaf_to_items(self, leaves: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranked leaves ``[B, W]`` (-1 = none) -> the first ``k`` items ``[B, k]`` and their scores.

        Each leaf stands for all items that share its codes, in item order, with the
        leaf's score; slots past the last item get item -1 and score -inf.
        """
        b = leaves.shape[0]
        safe = leaves.clamp(min=0)
        counts = torch.where(leaves >= 0, self.leaf_ptr[safe + 1] - self.leaf_ptr[safe], torch.zeros_like(leaves))
        if self.max_leaf_items == 1:      # the usual case (unique codes): a leaf is an item
            items = torch.where(counts > 0, self.leaf_items[self.leaf_ptr[safe]], torch.full_like(leaves, -1))
            sc = torch.where(counts > 0, scores, torch.full_like(scores, float("-inf")))
            if items.shape[1] < k:
                pad = k - items.shape[1]
                items = torch.cat([items, items.new_full((b, pad), -1)], 1)
                sc = torch.cat([sc, sc.new_full((b, pad), float("-inf"))], 1)
            return items[:, :k], sc[:, :k]
        ends = counts.cumsum(1)                                         # [B, W]
        slot = torch.arange(k, device=leaves.device).expand(b, k).contiguous()
        which = torch.searchsorted(ends, slot, right=True)              # leaf rank that holds each slot
        ok = which < leaves.shape[1]
        which = which.clamp(max=leaves.shape[1] - 1)
        offset = slot - (ends.gather(1, which) - counts.gather(1, which))
        pos = self.leaf_ptr[safe.gather(1, which)] + offset
        items = torch.where(ok, self.leaf_items[pos.clamp(max=len(self.leaf_items) - 1)], torch.full_like(slot, -1))
        sc = torch.where(ok, scores.gather(1, which), torch.full((b, k), float("-inf"), device=scores.device,
                                                                  dtype=scores.dtype))
        return items, sc
