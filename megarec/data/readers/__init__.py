"""Readers: any supported input format -> one :class:`~megarec.data.domain.Domain`.

``read_domain(path)`` detects the format from the files present:

- ``json``: ``<D>.inter.json`` (+ optional ``<D>.item.json``) -- :mod:`.json_layout`
- ``recbole``: RecBole atomic ``<D>.inter`` (+ optional ``<D>.item``) -- :mod:`.recbole`
- ``amazon2023``: raw Amazon Reviews 2023 ``<Cat>.jsonl[.gz]`` (+ optional
  ``meta_<Cat>.jsonl[.gz]``) -- :mod:`.amazon2023`

``path`` is the domain's folder or its interaction file. Every problem with
the input is a :class:`DataError` raised here, before any training starts.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from megarec.data.domain import DataError, Domain
from megarec.data.readers import amazon2023, json_layout, recbole

FORMATS: dict[str, ModuleType] = {"json": json_layout, "recbole": recbole, "amazon2023": amazon2023}

__all__ = ["FORMATS", "detect_format", "read_domain", "DataError"]


def detect_format(path: str | Path) -> tuple[str, Any]:
    """``(format name, files)`` for a folder or file; :class:`DataError` when no format matches."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    for fmt, module in FORMATS.items():
        files = module.detect(path)
        if files is not None:
            return fmt, files
    raise DataError(
        f"{path}: unknown data format; expected a folder or file of one of: "
        "<D>.inter.json [+ <D>.item.json] (json layout), <D>.inter [+ <D>.item] (RecBole atomic), "
        "<Category>.jsonl[.gz] [+ meta_<Category>.jsonl[.gz]] (raw Amazon Reviews 2023)")


def read_domain(path: str | Path, *, kcore: int | None = None, text_fields: Sequence[str] | None = None,
                name: str | None = None) -> Domain:
    """Read one domain in any supported format.

    kcore: k-core filtering repeated until stable; ``None`` = the format's
        default (5 for raw Amazon 2023, none otherwise); ``0`` or ``1`` = none.
    text_fields: the item fields kept as item text, in order (``None`` = the
        format's default); a field the item file lacks is a :class:`DataError`.
    name: domain name (default: the interaction file's stem, which is the folder name in the
        usual layout, e.g. ``"Scientific"``).
    """
    if kcore is not None and kcore < 0:
        raise DataError(f"kcore must be >= 0, got {kcore}")
    fmt, files = detect_format(path)
    domain = FORMATS[fmt].read(files, kcore=kcore, text_fields=text_fields, name=name)
    if domain.num_users == 0:
        raise DataError(f"{path}: no users" + (f" left after {kcore}-core filtering" if kcore else ""))
    return domain
