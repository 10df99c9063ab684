"""The item-shard format shared by the writer and the reader.

A shard folder holds WebDataset tar shards ``items-000000.tar``, ... and a
manifest ``index.json``. Each item is one WebDataset sample: tar members
``<safe key>.json`` (metadata) and, when the item has an image,
``<safe key>.jpg`` / ``.png`` / ``.webp`` (the encoded bytes, as on disk).

The metadata JSON is ``{"key", "domain", "item_id", "text", "positives",
"image_source"}``: ``key`` is the domain-qualified item key
``"<domain>/<item id>"``, ``text`` the item's text fields (``{}`` without an
item file), ``positives`` the domain-qualified keys of its co-occurrence
positives (one-hop neighbours in the training split), ``image_source`` where
the image came from (a path, ``"placeholder"``) or ``null``; and, when images
were resized at build time, ``image_original_size`` (``[height, width]`` of the
source image).

The manifest's ``image_size`` is ``[height, width]`` when every image was
resized to it (and re-encoded as ``image_format``) at build time, ``null`` (or
absent) when images are stored as they were on disk.

The manifest lists every shard with its item count, so a reader can give each
rank the same number of samples without opening any shard.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote

from megarec.data.domain import DataError

FORMAT = "megarec-item-shards/1"
MANIFEST = "index.json"
SHARD_PATTERN = "items-%06d.tar"
SHARD_GLOB = "items-*.tar"
IMAGE_EXTS = ("jpg", "png", "webp")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]|^_")


def safe_key(key: str) -> str:
    """``key`` made safe as a WebDataset sample key, reversibly (:func:`unsafe_key`).

    WebDataset splits a member name at the first dot of its base name into
    sample key and extension, treats ``/`` as a folder and skips names like
    ``__x__``; so every character outside ``[A-Za-z0-9_-]`` (and a leading
    ``_``) is percent-encoded as UTF-8: ``"Office/B00.5"`` -> ``"Office%2FB00%2E5"``.
    """
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), key)


def unsafe_key(safe: str) -> str:
    """Inverse of :func:`safe_key`."""
    return unquote(safe, encoding="utf-8", errors="strict")


def manifest_path(path: str | Path) -> Path:
    """The manifest of a shard folder (or the manifest file itself)."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write ``index.json`` atomically (a half-written build has no manifest)."""
    path = out_dir / MANIFEST
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


def load_manifest(path: str | Path) -> dict:
    """Read and check a shard manifest; shard paths come back absolute.

    Raises :class:`DataError` naming the file when the manifest is missing or
    malformed, a listed shard is missing, or the counts do not add up.
    """
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise DataError(f"{mpath}: no shard manifest (build shards with `megarec build-shards`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath}: broken JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: format {got!r}, expected {FORMAT!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{mpath}: 'shards' must be a non-empty list")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("path"), str) or not isinstance(s.get("count"), int) \
                or s["count"] < 0:
            raise DataError(f"{mpath}: shards[{i}] must be {{'path': str, 'count': int >= 0, ...}}, got {s!r}")
        full = mpath.parent / s["path"]
        if not full.is_file():
            raise DataError(f"{mpath}: shard {s['path']} is missing ({full})")
        s["path"] = str(full)
    total = sum(s["count"] for s in shards)
    if manifest.get("num_items") != total:
        raise DataError(f"{mpath}: num_items {manifest.get('num_items')} but the shards hold {total} items")
    if total == 0:
        raise DataError(f"{mpath}: the shards hold no items")
    return manifest
