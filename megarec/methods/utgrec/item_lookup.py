"""Random access to the items of a shard folder by key, for UTGRec's co-occurring positives.

The shards stream items in a shuffled order; the positive ``i+`` of an anchor (Sec. 2.3.2)
is any item, so its content is looked up here: every item's metadata (text, positives,
domain) is read once into memory by walking the tar headers (image data is not read), and
images are read on demand from their recorded byte ranges: a batch's images at once
(:meth:`ItemLookup.image_bytes`: grouped by shard, in offset order, one open per shard),
decoded at the model's size.
Positives in the shards come from the training split only (``megarec build-shards``).
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from megarec.data.domain import DataError
from megarec.data.images import load_image
from megarec.data.shard_format import IMAGE_EXTS, load_manifest, unsafe_key
from megarec.data.tar_samples import tar_members


def item_text(fields: dict, keep: Sequence[str] | None = None, sep: str = " ") -> str:
    """An item's text: its non-empty text fields (``keep``, in order; default all) joined by ``sep``."""
    names = list(keep) if keep else list(fields)
    return sep.join(str(fields[f]).strip() for f in names if fields.get(f) is not None and str(fields[f]).strip())


def _scan(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(safe key, {ext: (offset, size)})]`` of a tar shard, from its headers only."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name, start, size in tar_members(buf, path, len(buf)):
            prefix, ext = base_plus_ext(name)
            if prefix is None:
                continue
            if not out or out[-1][0] != prefix:
                out.append((prefix, {}))
            out[-1][1][ext.lower()] = (start, size)
    return out


class ItemLookup:
    """Item metadata by key (in memory) and images by key (read on demand) for one shard folder."""

    def __init__(self, path: str | Path, text_fields: Sequence[str] | None = None) -> None:
        self.manifest = load_manifest(path)
        self.text_fields = list(text_fields) if text_fields else None
        self.keys: list[str] = []
        self.domains: list[str] = []
        self._texts: list[str] = []
        self._positives: list[list[str]] = []
        self._images: list[tuple[int, int, int] | None] = []
        self._shards = [s["path"] for s in self.manifest["shards"]]
        for si, shard in enumerate(self._shards):
            with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for safe, members in _scan(shard):
                    if "json" not in members:
                        raise DataError(f"{shard}: sample {unsafe_key(safe)!r} has no .json member")
                    o, n = members["json"]
                    try:
                        meta = json.loads(buf[o:o + n])
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"{shard}: sample {unsafe_key(safe)!r}: broken JSON ({e})") from None
                    self.keys.append(meta["key"])
                    self.domains.append(meta["domain"])
                    self._texts.append(item_text(meta.get("text") or {}, self.text_fields))
                    self._positives.append(list(meta.get("positives") or []))
                    img = next(((si, *members[e]) for e in IMAGE_EXTS if e in members), None)
                    self._images.append(img)
        self.index = {k: i for i, k in enumerate(self.keys)}
        if len(self.index) != len(self.keys):
            raise DataError(f"{path}: duplicate item keys in the shards")

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        try:
            return self.index[key]
        except KeyError:
            raise DataError(f"item {key!r} is not in the shards ({self.manifest.get('domains')})") from None

    def text(self, i: int) -> str:
        return self._texts[i]

    def positives(self, i: int) -> list[str]:
        return self._positives[i]

    def has_image(self, i: int) -> bool:
        return self._images[i] is not None

    def image_bytes(self, positions: Sequence[int]) -> list[bytes | None]:
        """The stored image bytes of each item (``None`` without an image), read in one pass per shard: the
        batch's byte ranges are grouped by shard file and read in offset order, one open per shard."""
        out: list[bytes | None] = [None] * len(positions)
        by_shard: dict[int, list[tuple[int, int, int]]] = {}
        for j, i in enumerate(positions):
            loc = self._images[i]
            if loc is not None:
                by_shard.setdefault(loc[0], []).append((loc[1], loc[2], j))
        for si in sorted(by_shard):
            with open(self._shards[si], "rb") as f:
                for o, n, j in sorted(by_shard[si]):
                    f.seek(o)
                    out[j] = f.read(n)
        return out

    def decode(self, i: int, data: bytes, size: int | tuple[int, int]) -> torch.Tensor:
        """Item ``i``'s image ``data`` as a ``(3, size, size)`` uint8 tensor; :class:`DataError` if undecodable."""
        try:
            return load_image(data, size)
        except Exception as e:  # PIL raises many types
            si = self._images[i][0] if self._images[i] else 0
            raise DataError(f"{self._shards[si]}: image of {self.keys[i]!r} is undecodable ({e})") from None

    def image(self, i: int, size: int) -> torch.Tensor | None:
        """The item's image as a ``(3, size, size)`` uint8 tensor, or ``None`` when it has none."""
        data = self.image_bytes([i])[0]
        return None if data is None else self.decode(i, data, size)

    def num_images(self) -> int:
        return sum(loc is not None for loc in self._images)

    def sample_positive(self, key: str, rng: np.random.Generator) -> int:
        """Position of a co-occurring item of ``key`` drawn uniformly; the item itself when it has none."""
        i = self.position(key)
        pos = [p for p in self._positives[i] if p in self.index]
        return self.index[pos[int(rng.integers(len(pos)))]] if pos else i
