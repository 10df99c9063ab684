"""The recommender's token vocabulary over semantic-ID codes.

Every (level, code) pair is its own token, so the same code value at two
levels is two different tokens (TIGER Sec. 3.2; UTGRec/ETEGRec/UniGRec use the
same layout):

    PAD = 0, EOS = 1, token(l, c) = 2 + sum(K_0 .. K_{l-1}) + c

TIGER's dedup level is simply one more level with its own size. The vocabulary
also turns item histories into encoder inputs (flattened codes, right-padded)
and scatters per-level soft-code probabilities into vocabulary space
(UniGRec Eq. 15).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megarec.data.domain import DataError

PAD = 0
EOS = 1
NUM_SPECIAL = 2


class CodeVocab:
    """Token ids for ``len(codebook_sizes)`` code levels plus PAD and EOS."""

    PAD = PAD
    EOS = EOS

    def __init__(self, codebook_sizes: Sequence[int]) -> None:
        sizes = [int(k) for k in codebook_sizes]
        if not sizes or any(k < 1 for k in sizes):
            raise DataError(f"codebook sizes must be a non-empty list of positive ints, got {list(codebook_sizes)}")
        self.codebook_sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) + NUM_SPECIAL
        self.vocab_size = NUM_SPECIAL + int(sum(sizes))

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def __repr__(self) -> str:
        return f"CodeVocab(codebook_sizes={self.codebook_sizes}, vocab_size={self.vocab_size})"

    def level_range(self, level: int) -> tuple[int, int]:
        """``(start, end)``: level ``level``'s tokens are ``start .. end - 1``."""
        if not 0 <= level < self.num_levels:
            raise IndexError(f"level {level} outside 0..{self.num_levels - 1}")
        start = int(self.offsets[level])
        return start, start + self.codebook_sizes[level]

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``[N, L]`` -> token ids ``[N, L]`` int64 (clear error on a code outside its codebook)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_levels:
            raise DataError(f"codes must be [num_items, {self.num_levels}], got shape {codes.shape}")
        codes = codes.astype(np.int64)
        if codes.size:
            bad = (codes < 0) | (codes >= np.asarray(self.codebook_sizes))
            if bad.any():
                row, level = map(int, np.argwhere(bad)[0])
                raise DataError(f"item {row}: code {int(codes[row, level])} at level {level} is outside "
                                f"[0, {self.codebook_sizes[level]})")
        return codes + self.offsets

    def token_codes(self, tokens: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`item_tokens`: token ids ``[N, L]`` -> codes ``[N, L]``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        codes = tokens - self.offsets
        if tokens.size and ((codes < 0) | (codes >= np.asarray(self.codebook_sizes))).any():
            raise DataError("a token does not belong to the code level at its position")
        return codes

    ENCODE_CHUNK = 500_000   # rows per vectorised pass of :meth:`encode_histories`

    def encode_histories(self, histories: Sequence[np.ndarray], item_tokens: np.ndarray, *,
                         max_items: int | None = None, append_eos: bool = True,
                         dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
        """Item-index histories -> encoder ``(input_ids, attention_mask)`` ``[B, T]``, right-padded with PAD.

        Each history (oldest first) keeps its last ``max_items`` items, is flattened
        to their L tokens each and, with ``append_eos``, ends with EOS. ``T`` is the
        longest row. ``item_tokens`` is :meth:`item_tokens` of the whole catalogue.
        ``dtype`` of the ids (e.g. ``torch.int16`` to hold millions of rows; the mask is bool then).

        Vectorised (one gather for all rows): a per-row Python loop held a temporary array per
        sample, which at 10^6-10^7 training samples cost more memory than the result.
        """
        item_tokens = np.asarray(item_tokens)
        L = item_tokens.shape[1] if item_tokens.ndim == 2 else 1
        n_items = np.fromiter((min(len(h), max_items) if max_items is not None else len(h) for h in histories),
                              dtype=np.int64, count=len(histories))
        lengths = n_items * L + int(append_eos)
        width = int(lengths.max(initial=0)) or 1
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        ids = np.full((len(histories), width), PAD, dtype=np_dtype)
        for lo in range(0, len(histories), self.ENCODE_CHUNK):   # bounded temporaries at 10^7 rows
            hi = min(lo + self.ENCODE_CHUNK, len(histories))
            part = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories[lo:hi]]
            flat = np.concatenate([h[len(h) - n:] for h, n in zip(part, n_items[lo:hi])]) if part else np.zeros(0, np.int64)
            if flat.size and (flat.min() < 0 or flat.max() >= len(item_tokens)):
                raise DataError(f"history item index outside 0..{len(item_tokens) - 1}")
            per_row = n_items[lo:hi] * L
            rows = np.repeat(np.arange(lo, hi), per_row)
            cols = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            ids[rows, cols] = item_tokens[flat].reshape(-1)
        if append_eos:
            ids[np.arange(len(histories)), lengths - 1] = EOS
        mask = np.arange(width)[None, :] < lengths[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64) if dtype == torch.int64 else mask)

    def scatter_level_probs(self, level_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-level code probabilities ``[..., K_l]`` -> vocabulary-space rows ``[..., L, V]`` (UniGRec Eq. 15).

        ``scatter(0, {p_l(k)})``: level l's probabilities go to its token positions,
        zeros elsewhere. Differentiable in the probabilities. Flatten the result's
        ``L`` axis into the sequence axis to build a soft history.
        """
        if len(level_probs) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels of probabilities, got {len(level_probs)}")
        lead = level_probs[0].shape[:-1]
        out = level_probs[0].new_zeros(*lead, self.num_levels, self.vocab_size)
        for level, p in enumerate(level_probs):
            start, end = self.level_range(level)
            if p.shape[-1] != end - start or p.shape[:-1] != lead:
                raise ValueError(f"level {level}: expected probabilities [..., {end - start}] with leading shape "
                                 f"{tuple(lead)}, got {tuple(p.shape)}")
            out[..., level, start:end] = p
        return out

    def one_hot(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[...]`` -> one-hot float rows ``[..., V]`` (the hard limit of soft inputs)."""
        return torch.nn.functional.one_hot(tokens.long(), self.vocab_size).float()
