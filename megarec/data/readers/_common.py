"""Helpers shared by the format readers: opening plain or gzipped text, JSON
lines with line-numbered errors, and turning (user, item, time) rows into
chronological sequences.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megarec.data.domain import DataError


@dataclass
class Files:
    """A domain's interaction file, its optional item file, and the domain name."""

    inter: Path
    item: Path | None
    name: str


def open_text(path: Path) -> io.TextIOBase:
    """Open a UTF-8 text file (a leading BOM is dropped), transparently gunzipping ``*.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig")


def check_nonempty(path: Path) -> None:
    """Raise :class:`DataError` for a missing or zero-byte file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")


def load_json(path: Path) -> Any:
    """Parse a whole-file JSON document; errors name the file, line and column."""
    check_nonempty(path)
    with open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from e


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file (plain or .gz)."""
    check_nonempty(path)
    any_line = False
    with open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                any_line = True
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: broken JSON line: {e.msg} (column {e.colno})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
            raise DataError(f"{path}: cannot read: {e}") from e
    if not any_line:
        raise DataError(f"{path}: empty file")


def require(obj: dict, key: str, where: str) -> Any:
    """``obj[key]``, or a :class:`DataError` saying which field is missing where."""
    if key not in obj or obj[key] is None:
        raise DataError(f"{where}: missing required field {key!r}")
    return obj[key]


def text_value(value: Any, sep: str = " ") -> str:
    """A text field as one string: lists are joined with ``sep``, ``None`` is empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return sep.join(s for s in (text_value(v, sep) for v in value) if s)
    return str(value).strip()


class Interactions:
    """Collects (user, item, time) rows and turns them into chronological sequences.

    Users and items are numbered in order of first appearance; the line where
    each item was first seen is kept for error messages (:meth:`where`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self._item_line: list[int] = []
        self._users: list[int] = []
        self._items: list[int] = []
        self._times: list[float] = []

    def add(self, user: str, item: str, time: float, lineno: int) -> None:
        u = self.user_index.setdefault(user, len(self.user_index))
        i = self.item_index.get(item)
        if i is None:
            i = self.item_index[item] = len(self.item_index)
            self._item_line.append(lineno)
        self._users.append(u)
        self._items.append(i)
        self._times.append(time)

    def where(self, item: str) -> str:
        """``file:line`` of the first interaction with ``item``."""
        return f"{self.path}:{self._item_line[self.item_index[item]]}"

    def __len__(self) -> int:
        return len(self._items)

    def sequences(self) -> list[np.ndarray]:
        """Per user (first-appearance order), item indices sorted by time; ties keep file order."""
        users = np.asarray(self._users, dtype=np.int64)
        items = np.asarray(self._items, dtype=np.int64)
        times = np.asarray(self._times, dtype=np.float64)
        order = np.lexsort((times, users))  # stable: equal (user, time) keep their row order
        bounds = np.searchsorted(users[order], np.arange(len(self.user_index) + 1))
        items = items[order]
        return [items[bounds[u]:bounds[u + 1]] for u in range(len(self.user_index))]


def reorder_items(sequences: list[np.ndarray], item_ids: Sequence[str],
                  order: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """Renumber items so that item index follows ``order`` (e.g. the item file's).

    ``order`` lists ids that may include items never interacted with; only the
    ids in ``item_ids`` are kept.
    """
    present = set(item_ids)
    new_ids = [i for i in order if i in present]
    pos = {iid: k for k, iid in enumerate(new_ids)}
    remap = np.asarray([pos[i] for i in item_ids], dtype=np.int64)
    return [remap[s] for s in sequences], new_ids


def find_interaction_file(path: Path, suffix: str) -> Path | None:
    """The interaction file ``*<suffix>`` for a folder or file path, else ``None``.

    A folder may hold one such file, or several when one is named after the folder
    (``Toys/Toys<suffix>``); other ambiguity is a :class:`DataError`.
    """
    if path.is_file():
        return path if path.name.endswith(suffix) else None
    found = sorted(path.glob(f"*{suffix}"))
    preferred = path / f"{path.name}{suffix}"
    if preferred in found:
        return preferred
    if len(found) <= 1:
        return found[0] if found else None
    raise DataError(f"{path}: several interaction files ({', '.join(p.name for p in found)}); pass one of them")
