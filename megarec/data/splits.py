"""Leave-one-out splits, sliding-window training samples and co-occurrence positives.

Follows ../PROTOCOL.md: per user the last item is the test target, the
second-to-last the validation target, the rest is training. Validation history
ends before the validation item; test history includes it. Every prefix of the
training part predicts its next item. Histories keep the ``max_len`` items right
before the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megarec.data.domain import Domain


@dataclass
class Samples:
    """Parallel arrays of (user, history, target); histories are item-index arrays."""

    users: np.ndarray          # [n] user index in the domain
    histories: list[np.ndarray]
    targets: np.ndarray        # [n] item index

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    train: Samples
    valid: Samples
    test: Samples
    train_sequences: list[np.ndarray]  # the training part of every user's sequence


def leave_one_out(domain: Domain, max_len: int = 20, min_len: int = 3) -> Split:
    """Split every user with at least ``min_len`` interactions (PROTOCOL.md)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tr_u, tr_h, tr_t = [], [], []
    va_u, va_h, va_t = [], [], []
    te_u, te_h, te_t = [], [], []
    train_seqs: list[np.ndarray] = []
    for u, seq in enumerate(domain.sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < min_len:
            train_seqs.append(np.zeros(0, dtype=np.int64))
            continue
        train = seq[:-2]
        train_seqs.append(train)
        for t in range(1, len(train)):
            tr_u.append(u)
            tr_h.append(train[max(0, t - max_len):t])
            tr_t.append(train[t])
        va_u.append(u)
        va_h.append(train[-max_len:])
        va_t.append(seq[-2])
        te_u.append(u)
        te_h.append(seq[:-1][-max_len:])
        te_t.append(seq[-1])

    def pack(u, h, t) -> Samples:
        return Samples(np.asarray(u, dtype=np.int64), h, np.asarray(t, dtype=np.int64))

    return Split(pack(tr_u, tr_h, tr_t), pack(va_u, va_h, va_t), pack(te_u, te_h, te_t), train_seqs)


def cooccurrence_positives(train_sequences: list[np.ndarray], num_items: int) -> list[np.ndarray]:
    """One-hop neighbours of each item in the *training* parts only (UTGRec Sec. 2.3.2).

    Item j is a positive of item i when j stands right before or right after i
    in some user's training sequence (j != i). Validation and test items are
    never seen, so no target leaks into the tokenizer. Returns a sorted array of
    positives per item (empty for items with no training neighbour).
    """
    pairs = []
    for s in train_sequences:
        s = np.asarray(s, dtype=np.int64)
        if len(s) >= 2:
            pairs.append(np.stack([s[:-1], s[1:]], axis=1))
    if not pairs:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_items)]
    p = np.concatenate(pairs)
    p = np.concatenate([p, p[:, ::-1]])
    p = p[p[:, 0] != p[:, 1]]
    p = np.unique(p, axis=0)  # sorted by (item, neighbour)
    bounds = np.searchsorted(p[:, 0], np.arange(num_items + 1))
    return [p[bounds[i]:bounds[i + 1], 1] for i in range(num_items)]
