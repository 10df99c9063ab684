"""Samples + codes -> token tensors for the generative recommender.

Several domains share one code space: one codes file holds a semantic ID for
every item of every domain (keys ``"<domain>/<item id>"``), one
:class:`~megarec.data.code_vocab.CodeVocab` turns them into tokens, and the
training samples of all domains are concatenated into one set that the trainer
shuffles together (UTGRec Sec. 2.4, multi-domain pre-training on mixed code
sequences). Validation and test stay per domain: each is ranked against its own
domain's items (PROTOCOL.md: full ranking over every item of the domain).

Samples are tokenised once, up front, into right-padded host tensors; a batch is
an index-select trimmed to its longest row, so the training loop does no Python
work per sample.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megarec.data.code_vocab import CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.splits import Samples, Split, leave_one_out


@dataclass
class CodeSamples:
    """Tokenised (history, target) pairs, global item indices, on the host."""

    input_ids: torch.Tensor      # [n, T] int16/int32 (compact_dtype): history tokens, EOS, then PAD
    lengths: np.ndarray          # [n] real tokens per row (incl. EOS)
    labels: torch.Tensor         # [n, L] the target item's tokens
    targets: torch.Tensor        # [n] global item index of the target
    domains: torch.Tensor        # [n] domain index
    users: np.ndarray            # [n] user index inside its domain

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: np.ndarray | Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Collate rows ``indices`` into a batch on ``device``, padding trimmed to the longest row."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            raise ValueError("empty batch")
        width = int(self.lengths[idx].max())
        t = torch.from_numpy(idx)
        ids = self.input_ids.index_select(0, t)[:, :width].long()
        out = {"input_ids": ids, "attention_mask": (ids != CodeVocab.PAD).long(),
               "labels": self.labels.index_select(0, t), "targets": self.targets.index_select(0, t),
               "domains": self.domains.index_select(0, t)}
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def compact_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type holding every token id: host-side token tables of 10^7 samples are then
    a quarter of their int64 size (:meth:`CodeSamples.batch` hands out int64)."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def encode_samples(samples: Samples, vocab: CodeVocab, item_tokens: np.ndarray, *, item_offset: int = 0,
                   domain: int = 0, max_items: int | None = None) -> CodeSamples:
    """Tokenise one domain's samples; ``item_tokens`` is the *global* token table, its
    items at ``item_offset + local index``."""
    hist = [np.asarray(h, dtype=np.int64) + item_offset for h in samples.histories]
    ids, mask = vocab.encode_histories(hist, item_tokens, max_items=max_items, append_eos=True,
                                       dtype=compact_dtype(vocab.vocab_size))
    targets = np.asarray(samples.targets, dtype=np.int64) + item_offset
    if len(targets) and (targets.min() < 0 or targets.max() >= len(item_tokens)):
        raise DataError("a target item lies outside the codes table")
    return CodeSamples(
        input_ids=ids, lengths=mask.sum(1).numpy().astype(np.int64),
        labels=torch.from_numpy(np.asarray(item_tokens, dtype=np.int64)[targets].reshape(len(targets), -1)),
        targets=torch.from_numpy(targets), domains=torch.full((len(targets),), domain, dtype=torch.long),
        users=np.asarray(samples.users, dtype=np.int64))


def concat_samples(parts: Sequence[CodeSamples]) -> CodeSamples:
    """One set from several (rows in order); padding widened to the widest part."""
    if not parts:
        raise ValueError("nothing to concatenate")
    width = max(p.input_ids.shape[1] for p in parts)
    ids = torch.cat([torch.nn.functional.pad(p.input_ids, (0, width - p.input_ids.shape[1]), value=CodeVocab.PAD)
                     for p in parts])
    return CodeSamples(ids, np.concatenate([p.lengths for p in parts]), torch.cat([p.labels for p in parts]),
                       torch.cat([p.targets for p in parts]), torch.cat([p.domains for p in parts]),
                       np.concatenate([p.users for p in parts]))


def select_codes(codes: CodesFile, item_keys: Sequence[str], source: str = "the data") -> np.ndarray:
    """Rows of ``codes`` for ``item_keys`` in that order ``[N, L]``.

    The file may cover more items than the data (e.g. a pre-training codes file
    shared by several domains, used to fine-tune on one of them); an item of the
    data without a code is a :class:`DataError` that names it.
    """
    if list(item_keys) == codes.item_keys:
        return codes.codes
    pos = {k: i for i, k in enumerate(codes.item_keys)}
    if any(k not in pos for k in item_keys):
        codes.check_matches(item_keys, source)  # raises with the missing keys named
    return codes.codes[np.fromiter((pos[k] for k in item_keys), dtype=np.int64, count=len(item_keys))]


def merge_codes(files: Sequence[CodesFile], names: Sequence[str] | None = None) -> CodesFile:
    """One codes file for several domains coded by the same tokenizer (keys must not repeat).

    Codebook sizes must agree level by level; a dedup level (TIGER's extra token)
    takes the largest size among the files. Files coded separately resolve
    collisions only within themselves, so an item of one file can have the ID of
    an item of another: that is a :class:`DataError` naming the items (tokenize
    the domains together instead, so collisions are resolved over the merged
    catalogue). Collisions inside one file (policy ``none``) are kept as they are.
    ``names`` (e.g. the files' paths) only label the files in errors.
    """
    if not files:
        raise DataError("no codes files to merge")
    names = [str(n) for n in names] if names is not None else [f"codes file {i + 1}" for i in range(len(files))]
    first = files[0]
    sizes = list(first.codebook_sizes)
    for name, f in zip(names[1:], files[1:]):
        if f.dedup_level != first.dedup_level or len(f.codebook_sizes) != len(sizes):
            raise DataError(f"{name}: codes files to merge must have the same levels (and dedup level or not)")
        fixed = len(sizes) - (1 if first.dedup_level else 0)
        if f.codebook_sizes[:fixed] != sizes[:fixed]:
            raise DataError(f"{name}: codebook sizes differ: {f.codebook_sizes} vs {sizes}")
        if first.dedup_level:
            sizes[-1] = max(sizes[-1], f.codebook_sizes[-1])
    keys = [k for f in files for k in f.item_keys]
    if len(set(keys)) != len(keys):
        dup = [k for k, n in Counter(keys).items() if n > 1]
        raise DataError(f"{len(dup)} item keys appear in more than one codes file, e.g. {dup[:5]}")
    codes = np.concatenate([f.codes for f in files])
    check_no_shared_ids_across(codes, keys, np.repeat(np.arange(len(files)), [len(f.item_keys) for f in files]),
                               names)
    return CodesFile(keys, codes, sizes, first.dedup_level, {"merged_from": [f.stats for f in files]})


def check_no_shared_ids_across(codes: np.ndarray, keys: Sequence[str], part: np.ndarray,
                               names: Sequence[str]) -> None:
    """Raise a :class:`DataError` if an ID is held by items of two parts (``part[i]`` = part index of row i)."""
    if len(codes) == 0:
        return
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    lo = np.full(inverse.max() + 1, len(names), dtype=np.int64)
    hi = np.full(inverse.max() + 1, -1, dtype=np.int64)
    np.minimum.at(lo, inverse, part)
    np.maximum.at(hi, inverse, part)
    mixed = lo[inverse] != hi[inverse]
    if not mixed.any():
        return
    g = inverse[np.nonzero(mixed)[0][0]]
    example = [keys[i] for i in np.nonzero(inverse == g)[0][:4]]
    files = sorted({names[p] for p in part[mixed]})
    raise DataError(
        f"merging codes of separately tokenized domains would give {int(mixed.sum())} items the ID of an item "
        f"from another codes file ({', '.join(files)}), e.g. {example} all have "
        f"{tuple(int(c) for c in codes[np.nonzero(inverse == g)[0][0]])}; tokenize the domains together so "
        "collisions are resolved over the merged catalogue: `megarec tokenize A B --model DIR --out FILE` "
        "(or `megarec train-tokenizer A B --out DIR`)")


class CodeSequenceData:
    """Domains + one codes file -> mixed training samples and per-domain valid/test samples.

    ``item_tokens [N, L]`` covers every item of every domain in :class:`MultiDomain`
    order (global index = domain offset + local index).
    """

    def __init__(self, domains: Sequence[Domain], codes: CodesFile, max_len: int = 20, min_len: int = 3,
                 codes_source: str = "the codes file") -> None:
        self.multi = MultiDomain(list(domains))
        keys = self.multi.item_keys()
        data_names = "+".join(d.name for d in self.multi.domains)
        try:
            self.codes = select_codes(codes, keys, source=f"data {data_names}")
        except DataError as e:
            raise DataError(f"{codes_source}: {e}") from e
        self.vocab = CodeVocab(codes.codebook_sizes)
        self.item_tokens = self.vocab.item_tokens(self.codes)
        self.max_len = max_len
        self.splits: list[Split] = [leave_one_out(d, max_len=max_len, min_len=min_len) for d in self.multi.domains]
        self.train = concat_samples([self._encode(i, s.train) for i, s in enumerate(self.splits)])
        self.valid = [self._encode(i, s.valid) for i, s in enumerate(self.splits)]
        self.test = [self._encode(i, s.test) for i, s in enumerate(self.splits)]

    def _encode(self, d: int, samples: Samples) -> CodeSamples:
        return encode_samples(samples, self.vocab, self.item_tokens, item_offset=self.multi.offsets[d], domain=d,
                              max_items=self.max_len)

    @property
    def domain_names(self) -> list[str]:
        return self.multi.names

    def domain_items(self, d: int) -> np.ndarray:
        """Global indices of domain ``d``'s items (its ranking candidates)."""
        return self.multi.domain_items(d)
