"""The in-memory form of one recommendation domain, and several combined.

Every reader (``megarec.data.readers``) returns a :class:`Domain`: items with
text fields and an optional image, and chronological user sequences of item
*indices* (0..num_items-1, positions in ``item_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


class DataError(ValueError):
    """Input data is malformed; the message names the file (and line or key)."""


class MissingTextError(DataError):
    """A method needs item text but the domain has none."""


DEFAULT_TEXT_FIELDS = ("title", "brand", "categories", "description")


@dataclass
class Domain:
    """One domain as read from disk.

    ``sequences[u]`` is user ``users[u]``'s chronological list of item indices.
    ``item_text`` is ``None`` for a domain without an item file; otherwise one
    dict of text fields per item. ``item_image`` holds a path, URL or ``None``.
    ``text_fields`` are the fields that form the item text when a caller names
    none (set by the reader from the format or its ``text_fields`` argument;
    ``None`` means ``DEFAULT_TEXT_FIELDS``).
    """

    name: str
    item_ids: list[str]
    users: list[str]
    sequences: list[np.ndarray]
    item_text: list[dict[str, str]] | None = None
    item_image: list[str | None] | None = None
    source: str = ""
    text_fields: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.item_text is not None and len(self.item_text) != n:
            raise DataError(f"{self.name}: {len(self.item_text)} item records for {n} items")
        if self.item_image is not None and len(self.item_image) != n:
            raise DataError(f"{self.name}: {len(self.item_image)} images for {n} items")
        if len(self.users) != len(self.sequences):
            raise DataError(f"{self.name}: {len(self.users)} users but {len(self.sequences)} sequences")

    # -- sizes ---------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def has_text(self) -> bool:
        return self.item_text is not None

    def image(self, item: int) -> str | None:
        return None if self.item_image is None else self.item_image[item]

    # -- text ----------------------------------------------------------------
    def require_text(self, who: str) -> None:
        """Raise a clear error when ``who`` (a method or command) needs text we lack."""
        if not self.has_text:
            raise MissingTextError(
                f"{who} needs item text, but domain {self.name!r} ({self.source or 'no source'}) has no item file; "
                "use a domain with item text, or a tokenizer input that needs none (e.g. collaborative embeddings)"
            )

    def text(self, item: int, fields: Sequence[str] | None = None, sep: str = " ") -> str:
        """The item's text: the non-empty ``fields`` (default: the domain's ``text_fields``) joined in order."""
        self.require_text("item text")
        fields = fields or self.text_fields or DEFAULT_TEXT_FIELDS
        rec = self.item_text[item]  # type: ignore[index]
        return sep.join(str(rec[f]).strip() for f in fields if rec.get(f) and str(rec[f]).strip())

    def texts(self, fields: Sequence[str] | None = None) -> list[str]:
        return [self.text(i, fields) for i in range(self.num_items)]

    # -- statistics ----------------------------------------------------------
    def stats(self) -> dict[str, float | int | str]:
        """Users, items, interactions, average length and sparsity (the papers' Table 1)."""
        users, items, inter = self.num_users, self.num_items, self.num_interactions
        return {
            "domain": self.name,
            "users": users,
            "items": items,
            "interactions": inter,
            "avg_len": inter / users if users else 0.0,
            "sparsity": 1.0 - inter / (users * items) if users and items else 1.0,
        }

    # -- transforms ----------------------------------------------------------
    def subset_users(self, user_idx: Iterable[int]) -> "Domain":
        """The domain restricted to some users; items no longer used are dropped and re-indexed."""
        user_idx = list(user_idx)
        seqs = [self.sequences[u] for u in user_idx]
        used = np.unique(np.concatenate(seqs)) if seqs else np.zeros(0, dtype=np.int64)
        remap = np.full(self.num_items, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return Domain(
            name=self.name,
            item_ids=[self.item_ids[i] for i in used],
            users=[self.users[u] for u in user_idx],
            sequences=[remap[s] for s in seqs],
            item_text=None if self.item_text is None else [self.item_text[i] for i in used],
            item_image=None if self.item_image is None else [self.item_image[i] for i in used],
            source=self.source,
            text_fields=self.text_fields,
        )

    def sample_users(self, n: int, seed: int = 0) -> "Domain":
        """At most ``n`` users drawn uniformly without replacement (``seed`` fixed, so every run that
        asks for the same ``n`` gets the same users), in their original order, with the items they use.
        The result is not re-filtered: an item may keep fewer than k interactions."""
        if n <= 0:
            raise ValueError(f"sample_users: n must be positive, got {n}")
        if n >= self.num_users:
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(self.num_users, size=n, replace=False))
        return self.subset_users(chosen.tolist())


def kcore(domain: Domain, k: int = 5) -> Domain:
    """Repeat k-core filtering (users and items with >= k interactions) until stable."""
    if k <= 1:
        return domain
    seqs = [np.asarray(s) for s in domain.sequences]
    keep_users = np.ones(len(seqs), dtype=bool)
    while True:
        counts = np.bincount(np.concatenate([s for s, ok in zip(seqs, keep_users) if ok] or [np.zeros(0, np.int64)]),
                             minlength=domain.num_items)
        good_item = counts >= k
        changed = False
        for u, s in enumerate(seqs):
            if not keep_users[u]:
                continue
            filtered = s[good_item[s]]
            if len(filtered) != len(s):
                seqs[u] = filtered
                changed = True
            if len(filtered) < k:
                keep_users[u] = False
                changed = True
        if not changed:
            break
    kept = Domain(domain.name, domain.item_ids, [u for u, ok in zip(domain.users, keep_users) if ok],
                  [s for s, ok in zip(seqs, keep_users) if ok], domain.item_text, domain.item_image, domain.source,
                  domain.text_fields)
    return kept.subset_users(range(kept.num_users))


@dataclass
class MultiDomain:
    """Several domains in one item space: global item index = offset[d] + local index.

    Item keys are domain-qualified (``"<domain>/<item id>"``) so ids that clash
    across domains stay distinct.
    """

    domains: list[Domain]
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise DataError(f"domain names must be unique, got {names}")
        self.offsets = list(np.cumsum([0] + [d.num_items for d in self.domains])[:-1].tolist())

    @property
    def num_items(self) -> int:
        return sum(d.num_items for d in self.domains)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain_items(self, d: int) -> np.ndarray:
        """Global indices of domain ``d``'s items (its ranking candidates)."""
        start = self.offsets[d]
        return np.arange(start, start + self.domains[d].num_items, dtype=np.int64)

    def domain_index(self, name: str) -> int:
        for i, d in enumerate(self.domains):
            if d.name == name:
                return i
        raise KeyError(f"no domain {name!r}; have {[d.name for d in self.domains]}")

    def item_keys(self) -> list[str]:
        return [f"{d.name}/{iid}" for d in self.domains for iid in d.item_ids]

    def global_index(self, domain: int, item: int | np.ndarray) -> int | np.ndarray:
        return self.offsets[domain] + item

    def locate(self, global_item: int) -> tuple[int, int]:
        """(domain index, local item index) of a global item index."""
        d = int(np.searchsorted(self.offsets, global_item, side="right") - 1)
        return d, int(global_item - self.offsets[d])
