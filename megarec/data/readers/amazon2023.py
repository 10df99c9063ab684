"""Raw Amazon Reviews 2023: ``<Category>.jsonl`` reviews + optional ``meta_<Category>.jsonl`` (plain or .gz).

Reviews need ``user_id``, ``parent_asin`` and ``timestamp`` (ms); meta records
need ``parent_asin``. Items are identified by ``parent_asin`` (the product, not
its colour/size variant ``asin``), as in the papers' preprocessing.

Preprocessing follows the papers (UTGRec Sec. 3.1.1, ETEGRec Sec. 4.1.1,
UniGRec Sec. 4.1.1): 5-core filtering repeated until stable, then
chronological sequences (stable for equal timestamps). Repeated (user, item)
reviews are *kept*: none of the papers says it removes them. Item text fields
are ``title``, ``features`` and ``categories`` by default (UTGRec: "we
concatenate the title, feature, and category fields"); ``description`` and
``store`` are available through ``text_fields``. The item image is the URL of
the first ``large`` image ("we employ the 'large' size images").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


from megarec.data.domain import DataError, Domain, kcore as kcore_filter
from megarec.data.readers._common import Interactions, iter_json_lines, require, text_value

DEFAULT_KCORE = 5
DEFAULT_TEXT_FIELDS = ("title", "features", "categories")
# field -> separator joining its list elements (features/description are sentences).
TEXT_FIELDS = {"title": " ", "features": " ", "categories": ", ", "description": " ", "store": " "}
SUFFIXES = (".jsonl", ".jsonl.gz")
META_PREFIX = "meta_"


@dataclass
class Files:
    reviews: Path
    meta: Path | None
    name: str


def _stem(path: Path) -> str | None:
    for suf in SUFFIXES:
        if path.name.endswith(suf):
            return path.name[: -len(suf)]
    return None


def _sibling(folder: Path, stem: str) -> Path | None:
    for suf in SUFFIXES:
        if (folder / f"{stem}{suf}").is_file():
            return folder / f"{stem}{suf}"
    return None


def detect(path: Path) -> Files | None:
    """The reviews and meta files for a folder, a reviews file or a meta file, else ``None``."""
    if path.is_file():
        stem = _stem(path)
        if stem is None:
            return None
        if stem.startswith(META_PREFIX):
            reviews = _sibling(path.parent, stem[len(META_PREFIX):])
            if reviews is None:
                raise DataError(f"{path}: meta file without its reviews file {stem[len(META_PREFIX):]}.jsonl[.gz]")
            return Files(reviews, path, stem[len(META_PREFIX):])
        return Files(path, _sibling(path.parent, META_PREFIX + stem), stem)
    found = sorted(p for p in path.iterdir() if _stem(p) and not p.name.startswith(META_PREFIX))
    preferred = _sibling(path, path.name)
    if preferred is not None:
        reviews = preferred
    elif len(found) == 1:
        reviews = found[0]
    elif not found:
        return None
    else:
        raise DataError(f"{path}: several review files ({', '.join(p.name for p in found)}); pass one of them")
    stem = _stem(reviews)
    assert stem is not None
    return Files(reviews, _sibling(path, META_PREFIX + stem), stem)


def read(files: Files, *, kcore: int | None = None, text_fields: Sequence[str] | None = None,
         name: str | None = None) -> Domain:
    """Read, k-core filter (default 5, repeated until stable) and attach item text and image URLs."""
    fields = list(text_fields) if text_fields else list(DEFAULT_TEXT_FIELDS)
    unknown = [f for f in fields if f not in TEXT_FIELDS]
    if unknown:
        raise DataError(f"{files.meta or files.reviews}: no text field {unknown[0]!r} in Amazon 2023 meta "
                        f"(choose from {', '.join(TEXT_FIELDS)})")

    inter = Interactions(files.reviews)
    for lineno, rec in iter_json_lines(files.reviews):
        where = f"{files.reviews}:{lineno}"
        ts = require(rec, "timestamp", where)
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise DataError(f"{where}: timestamp {ts!r} is not a number")
        inter.add(str(require(rec, "user_id", where)), str(require(rec, "parent_asin", where)), float(ts), lineno)
    domain = Domain(name=name or files.name, item_ids=list(inter.item_index), users=list(inter.user_index),
                    sequences=inter.sequences(), source=str(files.reviews), text_fields=fields)
    k = DEFAULT_KCORE if kcore is None else kcore
    domain = kcore_filter(domain, k)
    if domain.num_users == 0:
        raise DataError(f"{files.reviews}: no user is left after {k}-core filtering")
    if files.meta is None:
        return domain

    wanted = {iid: k for k, iid in enumerate(domain.item_ids)}
    text: list[dict[str, str] | None] = [None] * domain.num_items
    image: list[str | None] = [None] * domain.num_items
    seen: dict[str, int] = {}
    for lineno, rec in iter_json_lines(files.meta):
        iid = str(require(rec, "parent_asin", f"{files.meta}:{lineno}"))
        if iid in seen:
            raise DataError(f"{files.meta}:{lineno}: item {iid!r} repeated (first on line {seen[iid]})")
        seen[iid] = lineno
        k = wanted.get(iid)
        if k is not None:
            text[k] = {f: text_value(rec.get(f), TEXT_FIELDS[f]) for f in fields}
            image[k] = first_large_image(rec.get("images"))
    missing = [k for k, t in enumerate(text) if t is None]
    if missing:
        iid = domain.item_ids[missing[0]]
        raise DataError(f"{inter.where(iid)}: item {iid!r} has no record in {files.meta} "
                        f"({len(missing)} items without one)")
    domain.item_text = text  # type: ignore[assignment]
    domain.item_image = image
    return domain


def first_large_image(images: Any) -> str | None:
    """URL of the first ``large`` image: ``images`` is a list of {thumb, large, hi_res, variant} dicts."""
    if isinstance(images, dict):  # the column-wise variant {"large": [...], ...}
        images = [{"large": u} for u in images.get("large") or []]
    for im in images or []:
        if isinstance(im, dict) and im.get("large"):
            return str(im["large"])
    return None
