"""The ``<D>.inter.json`` + optional ``<D>.item.json`` layout (most generative-recommendation code).

    <D>.inter.json   {"<user>": [item, item, ...]}                     oldest first
    <D>.item.json    {"<item>": {"title": ..., "description": ..., ...}}  optional

Item ids may be integers or strings in the sequences; they are matched to the
item file's keys as strings. Item index follows the item file's key order
(items nobody interacted with are dropped), or first appearance without one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megarec.data.domain import DEFAULT_TEXT_FIELDS, DataError, Domain, kcore as kcore_filter
from megarec.data.readers._common import Files, find_interaction_file, load_json, reorder_items, text_value

INTER_SUFFIX = ".inter.json"
ITEM_SUFFIX = ".item.json"


def detect(path: Path) -> Files | None:
    """The layout's files for a folder or an ``*.inter.json`` path, else ``None``."""
    inter = find_interaction_file(path, INTER_SUFFIX)
    if inter is None:
        return None
    stem = inter.name[: -len(INTER_SUFFIX)]
    item = inter.with_name(stem + ITEM_SUFFIX)
    return Files(inter, item if item.exists() else None, stem)


def _item_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: item ids must be integers or strings, got {value!r}")
    return str(value)


def read(files: Files, *, kcore: int | None = None, text_fields: Sequence[str] | None = None,
         name: str | None = None) -> Domain:
    """Read the layout into a :class:`Domain` (sequences as stored; k-core filtering only if asked)."""
    inter = load_json(files.inter)
    if not isinstance(inter, dict):
        raise DataError(f"{files.inter}: top level must be an object {{user: [items]}}, got {type(inter).__name__}")
    if not inter:
        raise DataError(f"{files.inter}: no users")
    item_index: dict[str, int] = {}
    users: list[str] = []
    sequences: list[np.ndarray] = []
    for user, seq in inter.items():
        where = f"{files.inter}: user {user!r}"
        if not isinstance(seq, list):
            raise DataError(f"{where}: expected a list of item ids, got {type(seq).__name__}")
        idx = [item_index.setdefault(_item_id(i, where), len(item_index)) for i in seq]
        users.append(str(user))
        sequences.append(np.asarray(idx, dtype=np.int64))
    item_ids = list(item_index)

    item_text = None
    if files.item is not None:
        records = load_json(files.item)
        if not isinstance(records, dict):
            raise DataError(f"{files.item}: top level must be an object {{item: {{field: text}}}}")
        for iid in item_ids:
            if iid not in records:
                user = next(u for u, s in zip(users, sequences) if item_index[iid] in s)
                raise DataError(f"{files.inter}: user {user!r}: item {iid!r} has no record in {files.item}")
        sequences, item_ids = reorder_items(sequences, item_ids, list(records))
        item_text = [_record(records[iid], iid, files.item, text_fields) for iid in item_ids]
        if not text_fields and not any(f in rec for rec in item_text for f in DEFAULT_TEXT_FIELDS):
            found = sorted({f for rec in item_text for f in rec})
            raise DataError(f"{files.item}: no item has any of the default text fields "
                            f"{', '.join(DEFAULT_TEXT_FIELDS)}; name the fields to use with text_fields "
                            f"(found: {', '.join(found) or 'none'})")

    domain = Domain(name=name or files.name, item_ids=item_ids, users=users, sequences=sequences,
                    item_text=item_text, source=str(files.inter),
                    text_fields=list(text_fields) if text_fields else None)
    return kcore_filter(domain, kcore or 0)


def _record(rec: object, iid: str, path: Path, text_fields: Sequence[str] | None) -> dict[str, str]:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: item {iid!r}: expected an object of text fields, got {type(rec).__name__}")
    if text_fields:
        missing = [f for f in text_fields if f not in rec]
        if missing:
            raise DataError(f"{path}: item {iid!r}: missing field {missing[0]!r} "
                            f"(has {', '.join(map(repr, rec)) or 'no fields'})")
        return {f: text_value(rec[f]) for f in text_fields}
    return {str(k): text_value(v) for k, v in rec.items()}


def write(domain: Domain, folder: str | Path) -> Path:
    """Write ``domain`` in this layout (one user or item per line); returns the inter file's path.

    Item ids are written as integers when they all are, as the layout's readers expect.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    as_int = all(i.isdigit() and str(int(i)) == i for i in domain.item_ids)
    ids = [int(i) if as_int else i for i in domain.item_ids]
    inter = folder / f"{domain.name}{INTER_SUFFIX}"
    _write_object(inter, ((u, [ids[i] for i in s.tolist()]) for u, s in zip(domain.users, domain.sequences)))
    if domain.item_text is not None:
        _write_object(folder / f"{domain.name}{ITEM_SUFFIX}", zip(domain.item_ids, domain.item_text))
    return inter


def _write_object(path: Path, pairs: Iterable[tuple[str, object]]) -> None:
    lines = [f"{json.dumps(str(k))}: {json.dumps(v, ensure_ascii=False)}" for k, v in pairs]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
