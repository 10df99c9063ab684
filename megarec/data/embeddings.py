"""Item-embedding files: text or collaborative (SASRec) embeddings keyed by item.

Format (safetensors, no pickle): tensor ``embeddings`` float32 ``[N, d]``;
metadata ``format = "megarec-embeddings/1"``, ``item_keys`` (JSON list of
domain-qualified keys ``"<domain>/<item id>"``, row order) and ``source``
(free text: which model produced them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megarec.data.domain import DataError

FORMAT = "megarec-embeddings/1"


def save_item_embeddings(path: str | Path, embeddings: torch.Tensor | np.ndarray, item_keys: Sequence[str],
                         source: str = "") -> None:
    emb = torch.as_tensor(embeddings, dtype=torch.float32).detach().cpu().contiguous()
    if emb.ndim != 2 or emb.shape[0] != len(item_keys):
        raise DataError(f"embeddings must be [num_items={len(item_keys)}, d], got {tuple(emb.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb}, str(path),
              metadata={"format": FORMAT, "item_keys": json.dumps(list(item_keys)), "source": source})


def load_item_embeddings(path: str | Path, item_keys: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Read an embeddings file; with ``item_keys``, return rows in that order (clear error if any is missing)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            emb = fh.get_tensor("embeddings")
    except Exception as e:
        raise DataError(f"{path}: not a MegaRec embeddings file ({e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    keys = json.loads(meta["item_keys"])
    if item_keys is None or list(item_keys) == keys:
        return emb, keys
    pos = {k: i for i, k in enumerate(keys)}
    missing = [k for k in item_keys if k not in pos]
    if missing:
        raise DataError(f"{path}: no embedding for {len(missing)} items, e.g. {missing[:5]}")
    return emb[torch.tensor([pos[k] for k in item_keys])], list(item_keys)
