"""RecBole atomic files: ``<D>.inter`` and an optional ``<D>.item``.

Both are tab-separated with a header of ``name:type`` columns (types
``token``, ``token_seq``, ``float``, ``float_seq``), in any order::

    user_id:token   item_id:token   rating:float    timestamp:float
    u1              i7              5.0             1389052800

    item_id:token   title:token_seq     brand:token     price:float
    i7              Red Widget 3000     Acme            9.99

The inter file needs ``user_id``, ``item_id`` and ``timestamp``; other columns
are ignored. Sequences are sorted by timestamp (stable: ties keep file order).
Item text fields are the item file's ``token``/``token_seq`` columns (all of
them, in column order, unless ``text_fields`` names some); a ``token_seq``
value is space-separated tokens and is kept as one string.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from megarec.data.domain import DataError, Domain, kcore as kcore_filter
from megarec.data.readers._common import (Files, Interactions, check_nonempty, find_interaction_file, open_text,
                                          reorder_items)

INTER_SUFFIX = ".inter"
ITEM_SUFFIX = ".item"
TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_TYPES = ("token", "token_seq")


def detect(path: Path) -> Files | None:
    """The atomic files for a folder or an ``*.inter`` path, else ``None``."""
    inter = find_interaction_file(path, INTER_SUFFIX)
    if inter is None:
        return None
    item = inter.with_suffix(ITEM_SUFFIX)
    return Files(inter, item if item.exists() else None, inter.stem)


def _rows(path: Path) -> tuple[dict[str, tuple[int, str]], Iterator[tuple[int, list[str]]]]:
    """The header as {name: (column, type)} and an iterator of (line number, cells)."""
    check_nonempty(path)
    fh = open_text(path)
    # Plain split, not csv: atomic files have no quoting, and csv caps field sizes.
    header = fh.readline().rstrip("\r\n").split("\t")
    if not any(h.strip() for h in header):
        fh.close()
        raise DataError(f"{path}: empty file")
    columns: dict[str, tuple[int, str]] = {}
    for col, h in enumerate(header):
        name, sep, typ = h.strip().rpartition(":")
        if not sep or typ not in TYPES or not name:
            fh.close()
            raise DataError(f"{path}:1: column {h!r} is not 'name:type' with type one of {', '.join(TYPES)}")
        columns[name] = (col, typ)

    def rows() -> Iterator[tuple[int, list[str]]]:
        with fh:
            for lineno, line in enumerate(fh, 2):
                if not line.strip():
                    continue
                cells = line.rstrip("\r\n").split("\t")
                if len(cells) != len(header):
                    raise DataError(f"{path}:{lineno}: {len(cells)} columns, the header has {len(header)}")
                yield lineno, cells

    return columns, rows()


def _need(columns: dict[str, tuple[int, str]], name: str, path: Path) -> int:
    if name not in columns:
        raise DataError(f"{path}:1: missing required column {name!r} (columns: {', '.join(columns)})")
    return columns[name][0]


def read(files: Files, *, kcore: int | None = None, text_fields: Sequence[str] | None = None,
         name: str | None = None) -> Domain:
    """Read the atomic files into a :class:`Domain` (k-core filtering only if asked)."""
    columns, rows = _rows(files.inter)
    cu, ci, ct = (_need(columns, c, files.inter) for c in ("user_id", "item_id", "timestamp"))
    inter = Interactions(files.inter)
    for lineno, cells in rows:
        try:
            t = float(cells[ct])
        except ValueError:
            raise DataError(f"{files.inter}:{lineno}: timestamp {cells[ct]!r} is not a number") from None
        inter.add(cells[cu], cells[ci], t, lineno)
    if not len(inter):
        raise DataError(f"{files.inter}: no interactions (header only)")
    sequences, item_ids = inter.sequences(), list(inter.item_index)
    users = list(inter.user_index)

    item_text, fields = None, None
    if files.item is not None:
        records, order, fields = _read_items(files.item, text_fields)
        for iid in item_ids:
            if iid not in records:
                raise DataError(f"{inter.where(iid)}: item {iid!r} has no record in {files.item}")
        sequences, item_ids = reorder_items(sequences, item_ids, order)
        item_text = [records[iid] for iid in item_ids]
    domain = Domain(name=name or files.name, item_ids=item_ids, users=users, sequences=sequences,
                    item_text=item_text, source=str(files.inter), text_fields=fields)
    return kcore_filter(domain, kcore or 0)


def _read_items(path: Path, text_fields: Sequence[str] | None
                ) -> tuple[dict[str, dict[str, str]], list[str], list[str]]:
    columns, rows = _rows(path)
    ci = _need(columns, "item_id", path)
    text_cols = [c for c, (_, typ) in columns.items() if typ in TEXT_TYPES and c != "item_id"]
    if text_fields:
        for f in text_fields:
            if f not in columns:
                raise DataError(f"{path}:1: no column {f!r} for the item text (text columns: {', '.join(text_cols)})")
            if columns[f][1] not in TEXT_TYPES:
                raise DataError(f"{path}:1: column {f!r} is {columns[f][1]}, not a text (token/token_seq) column")
        text_cols = list(text_fields)
    records: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for lineno, cells in rows:
        iid = cells[ci]
        if iid in records:
            raise DataError(f"{path}:{lineno}: item {iid!r} repeated (first on line {first_line[iid]})")
        first_line[iid] = lineno
        # token_seq: space-separated tokens; normalise runs of whitespace to one space.
        records[iid] = {c: " ".join(cells[columns[c][0]].split()) for c in text_cols}
    if not records:
        raise DataError(f"{path}: no items (header only)")
    return records, list(records), text_cols
