"""User histories given to ``megarec recommend`` as a file (JSON lines)."""
from __future__ import annotations

import json
from pathlib import Path

from megarec.data.domain import DataError


def read_histories(path: str | Path) -> list[tuple[str | None, list]]:
    """``megarec recommend --histories FILE``: JSON lines, each a list of item ids or ``{"user": ..., "history":
    [...]}``; ``[(user or None, history)]``. A bad line is a DataError naming the file and line."""
    rows = []
    f = Path(path)
    if not f.is_file():
        raise DataError(f"histories file {path} does not exist")
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        user, hist = (obj.get("user"), obj.get("history")) if isinstance(obj, dict) else (None, obj)
        if not isinstance(hist, list) or not hist:
            raise DataError(f"{path}:{n}: expected a non-empty list of item ids (or {{\"history\": [...]}})")
        rows.append((user, hist))
    if not rows:
        raise DataError(f"{path}: no histories")
    return rows
