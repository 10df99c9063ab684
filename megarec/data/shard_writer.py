"""Write domains as WebDataset item shards (format: :mod:`megarec.data.shard_format`).

Images are stored as they are on disk, or (``image_size``) resized to the model's
input resolution and re-encoded once, at build time, as img2dataset prepares
WebDataset shards for a known training resolution: reading then decodes a small
file and needs no resize (:func:`megarec.data.images.prepare_image`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.images import STORED_FORMATS, image_hw, placeholder_bytes, prepare_image
from megarec.data.images import image_format as format_name  # write_shards has an image_format argument
from megarec.data.shard_format import (FORMAT, IMAGE_EXTS, MANIFEST, SHARD_GLOB, SHARD_PATTERN, safe_key,
                                       write_manifest)
from megarec.data.splits import cooccurrence_positives, leave_one_out
from megarec.distributed import get_logger

IMAGE_MODES = ("none", "files", "placeholder")


def domain_positives(domain: Domain, max_len: int = 20) -> list[list[str]]:
    """Domain-qualified keys of each item's co-occurrence positives in the leave-one-out training split."""
    split = leave_one_out(domain, max_len=max_len)
    pos = cooccurrence_positives(split.train_sequences, domain.num_items)
    return [[f"{domain.name}/{domain.item_ids[j]}" for j in p] for p in pos]


def _as_domains(data: Domain | MultiDomain | Sequence[Domain]) -> list[Domain]:
    if isinstance(data, Domain):
        return [data]
    if isinstance(data, MultiDomain):
        return list(data.domains)
    domains = list(data)
    MultiDomain(domains)  # checks that names are unique
    return domains


def _image_ext(data: bytes, path: str) -> str:
    """Member extension from the image's magic bytes (falls back to the file suffix)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    ext = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
    return ext if ext in IMAGE_EXTS else "jpg"


def _check_image_files(domains: list[Domain]) -> None:
    """Fail before writing anything when an item's image is not a readable file."""
    bad = [f"{d.name}/{d.item_ids[i]}: {p}" for d in domains if d.item_image is not None
           for i, p in enumerate(d.item_image) if p is not None and not os.path.isfile(p)]
    if bad:
        raise DataError(f"images='files' but {len(bad)} item images are not files on disk (for URLs run "
                        f"`megarec download-images` and pass its folder as --image-dir), e.g. {bad[:3]}")


def interleaved_order(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(domain, item)`` pairs of domains with ``sizes`` items, interleaved in proportion to their sizes (item
    ``i`` of domain ``d`` at fraction ``(i + 0.5) / sizes[d]``; ties in domain order) with each domain's own order
    kept. Multi-domain shards written this way hold every domain in proportion, so training batches mix
    domains (UTGRec Sec. 2.3.2: in-batch negatives from several domains) even through a small shuffle
    buffer; domain after domain, a pre-training run would see one domain for its first thousands of steps."""
    pairs = [(d, i) for d, n in enumerate(sizes) for i in range(n)]
    return sorted(pairs, key=lambda p: ((2 * p[1] + 1) / (2 * sizes[p[0]]), p[0]))


def _samples(domains: list[Domain], positives: Sequence[Sequence[str]], images: str, placeholder_size: int,
             resize: tuple[tuple[int, int], str, int] | None) -> Iterator[dict]:
    """One WebDataset sample per item, domains interleaved (:func:`interleaved_order`); ``resize``:
    ``((height, width), format, quality)`` to store images at."""
    offsets = np.cumsum([0] + [d.num_items for d in domains])
    for di, i in interleaved_order([d.num_items for d in domains]):
        d = domains[di]
        g = int(offsets[di]) + i            # the item's position in MultiDomain.item_keys() order (positives)
        item_id = d.item_ids[i]
        key = f"{d.name}/{item_id}"
        path = d.image(i)
        sample = {"__key__": safe_key(key)}
        source, data, ext, original = None, None, "jpg", None
        if images == "files" and path is not None:
            with open(path, "rb") as fh:
                data = fh.read()
            ext, source = _image_ext(data, path), str(path)
        elif images == "placeholder":
            data, source = placeholder_bytes(key, placeholder_size), "placeholder"
        if data is not None and resize is not None:
            try:
                data, original = prepare_image(data, *resize)
            except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
                raise DataError(f"{key}: cannot resize image {source} to {resize[0]} "
                                f"({type(e).__name__}: {e})") from None
            ext = STORED_FORMATS[resize[1]]
        if data is not None:
            sample[ext] = data
        meta = {"key": key, "domain": d.name, "item_id": item_id,
                "text": dict(d.item_text[i]) if d.item_text is not None else {},
                "positives": list(positives[g]), "image_source": source}
        if original is not None:
            meta["image_original_size"] = list(original)  # (height, width) before the build-time resize
        sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        yield sample


def write_shards(data: Domain | MultiDomain | Sequence[Domain], out_dir: str | Path, *, max_count: int = 10000,
                 max_size: int = 1 << 30, positives: Sequence[Sequence[str]] | None = None,
                 images: str = "none", image_size: int | tuple[int, int] | None = None, image_format: str = "JPEG",
                 image_quality: int = 95, placeholder_size: int = 256, max_len: int = 20, overwrite: bool = False,
                 progress: bool = False) -> list[Path]:
    """Write every item of ``data`` into ``out_dir/items-%06d.tar`` and ``index.json``.

    A shard is closed once it holds ``max_count`` items or ``max_size`` bytes of
    member data (a shard can exceed ``max_size`` by one item; tar headers add
    ~1 KiB per member). ``positives`` gives, per item in
    ``MultiDomain.item_keys()`` order, the keys of its positives; by default
    they are the co-occurrence positives of each domain's leave-one-out
    training split (histories capped at ``max_len``). ``images``: ``"none"``
    (no image members), ``"files"`` (each item's image file as stored on disk;
    items without one get none), ``"placeholder"`` (a rendered
    ``placeholder_size`` px JPEG for every item, see :mod:`megarec.data.images`).

    ``image_size`` (one side or ``(height, width)``, the model's input
    resolution): store each image resized to exactly that size, the way
    ``ShardDataset(image_size=...)`` resizes at read time (drafted JPEG decode,
    torch's uint8 bicubic resize), re-encoded as ``image_format`` (JPEG, PNG or
    WEBP) at ``image_quality``. The manifest records the stored size
    (``image_size``, ``[height, width]``; ``null`` for images as on disk) and each
    item's metadata its ``image_original_size``. The original image is not kept.
    Returns the shard paths in order.
    """
    if images not in IMAGE_MODES:
        raise DataError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    resize = None
    if image_size is not None:
        if images == "none":
            raise DataError("image_size resizes stored images, but images='none' stores none")
        try:
            resize = (image_hw(image_size), format_name(image_format), int(image_quality))
        except ValueError as e:
            raise DataError(str(e)) from None
        if not 1 <= resize[2] <= 100:
            raise DataError(f"image quality must be in [1, 100], got {image_quality}")
    if max_count < 1 or max_size < 1:
        raise DataError(f"max_count and max_size must be >= 1, got {max_count} and {max_size}")
    domains = _as_domains(data)
    num_items = sum(d.num_items for d in domains)
    if num_items == 0:
        raise DataError("no items to write: every domain is empty")
    if positives is None:
        positives = [p for d in domains for p in domain_positives(d, max_len)]
    elif len(positives) != num_items:
        raise DataError(f"positives has {len(positives)} entries for {num_items} items")
    if images == "files":
        _check_image_files(domains)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob(SHARD_GLOB)) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    if old and not overwrite:
        raise DataError(f"{out} already holds shards ({old[0].name}, ...); pass overwrite=True / --overwrite")
    for p in old:
        p.unlink()

    counts: dict[str, int] = {}
    pattern = os.path.join(str(out).replace("%", "%%"), SHARD_PATTERN)  # a '%' in the folder is not a format
    # mtime=0 makes the shards byte-identical across rebuilds; PAX headers carry long keys.
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0, encoder=False,
                         mtime=0, format="PAX_FORMAT") as sink:
        for sample in tqdm(_samples(domains, positives, images, placeholder_size, resize), total=num_items,
                           desc="build-shards", unit="item", disable=not progress):
            sink.write(sample)
            counts[sink.fname] = counts.get(sink.fname, 0) + 1
    paths = [Path(f) for f in counts]
    manifest = {
        "format": FORMAT,
        "num_items": num_items,
        "images": images,
        # Stored image size ([height, width]) when resized at build time; null: images as on disk.
        "image_size": list(resize[0]) if resize else None,
        "image_format": resize[1] if resize else None,
        "image_quality": resize[2] if resize and resize[1] != "PNG" else None,
        "max_len": max_len,
        "domains": [{"name": d.name, "items": d.num_items, "has_text": d.has_text} for d in domains],
        "shards": [{"path": p.name, "count": counts[str(p)], "bytes": p.stat().st_size} for p in paths],
    }
    write_manifest(out, manifest)
    get_logger("megarec.shards").info("wrote %d items into %d shards under %s", num_items, len(paths), out)
    return paths
