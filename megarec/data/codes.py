"""The codes file: the semantic ID of every item, written by the tokenizer and
read by the recommender.

Format (one safetensors file, no pickle):

- tensor ``codes``: int64 ``[num_items, num_levels]``; row i is the ID of item
  ``item_keys[i]``; level l holds a code in ``[0, codebook_sizes[l])``.
- metadata (all strings, JSON-encoded):
  - ``format``: ``"megarec-codes/1"``
  - ``item_keys``: list of domain-qualified keys ``"<domain>/<item id>"``
  - ``codebook_sizes``: list of ints, one per level
  - ``dedup_level``: ``true`` when the last level is TIGER's extra dedup token
  - ``stats``: free-form dict (collision rates, per-level usage, ...)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megarec.data.domain import DataError

FORMAT = "megarec-codes/1"


@dataclass
class CodesFile:
    item_keys: list[str]
    codes: np.ndarray                  # [N, L] int64
    codebook_sizes: list[int]
    dedup_level: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or self.codes.shape[0] != len(self.item_keys):
            raise DataError(f"codes must be [num_items={len(self.item_keys)}, levels], got {self.codes.shape}")
        if self.codes.shape[1] != len(self.codebook_sizes):
            raise DataError(f"{self.codes.shape[1]} code levels but {len(self.codebook_sizes)} codebook sizes")
        if len(self.codes) and (self.codes.min() < 0 or (self.codes >= np.asarray(self.codebook_sizes)).any()):
            raise DataError("a code lies outside its codebook")

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def collision_rate(self) -> float:
        """Fraction of items whose full ID is shared with another item."""
        if len(self.codes) == 0:
            return 0.0
        _, inverse, counts = np.unique(self.codes, axis=0, return_inverse=True, return_counts=True)
        return float((counts[inverse.reshape(-1)] > 1).mean())

    def shared_ids(self, limit: int | None = None) -> list[list[str]]:
        """Groups of item keys that share one full ID (at most ``limit`` groups, in item order)."""
        if len(self.codes) == 0:
            return []
        _, inverse, counts = np.unique(self.codes, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        groups: dict[int, list[str]] = {}
        for i in np.nonzero(counts[inverse] > 1)[0]:
            g = int(inverse[i])
            if g not in groups and limit is not None and len(groups) >= limit:
                continue
            groups.setdefault(g, []).append(self.item_keys[i])
        return list(groups.values())

    def save(self, path: str | Path) -> None:
        """Write the file; a partial write never replaces an existing file (written aside, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "item_keys": json.dumps(self.item_keys),
            "codebook_sizes": json.dumps([int(k) for k in self.codebook_sizes]),
            "dedup_level": json.dumps(bool(self.dedup_level)),
            "stats": json.dumps(self.stats),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"codes": torch.from_numpy(np.ascontiguousarray(self.codes))}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "CodesFile":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"codes file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                codes = fh.get_tensor("codes").numpy()
        except Exception as e:  # safetensors raises several types for a bad header
            raise DataError(f"{path}: not a MegaRec codes file ({e})") from e
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(json.loads(meta["item_keys"]), codes, json.loads(meta["codebook_sizes"]),
                   json.loads(meta["dedup_level"]), json.loads(meta.get("stats", "{}")))

    def check_matches(self, item_keys: Sequence[str], source: str = "the data") -> None:
        """Raise a clear error unless this file has a code for exactly ``item_keys``, in order."""
        if list(item_keys) == self.item_keys:
            return
        have, want = set(self.item_keys), set(item_keys)
        missing = [k for k in item_keys if k not in have][:5]
        extra = [k for k in self.item_keys if k not in want][:5]
        detail = []
        if missing:
            detail.append(f"items in {source} without a code: {missing}")
        if extra:
            detail.append(f"codes for items not in {source}: {extra}")
        if not detail:
            detail.append("same items in a different order")
        raise DataError(f"codes file ({len(self.item_keys)} items) does not match {source} "
                        f"({len(item_keys)} items): " + "; ".join(detail))
