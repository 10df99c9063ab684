"""Write domains as WebDataset item shards (format: :mod:`megarec.data.shard_format`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import webdataset as wds
from tqdm import tqdm

from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.images import placeholder_bytes
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


def _samples(domains: list[Domain], positives: Sequence[Sequence[str]], images: str,
             image_size: int) -> Iterator[dict]:
    g = 0
    for d in domains:
        for i, item_id in enumerate(d.item_ids):
            key = f"{d.name}/{item_id}"
            path = d.image(i)
            sample = {"__key__": safe_key(key)}
            source = None
            if images == "files" and path is not None:
                with open(path, "rb") as fh:
                    data = fh.read()
                sample[_image_ext(data, path)] = data
                source = str(path)
            elif images == "placeholder":
                sample["jpg"] = placeholder_bytes(key, image_size)
                source = "placeholder"
            meta = {"key": key, "domain": d.name, "item_id": item_id,
                    "text": dict(d.item_text[i]) if d.item_text is not None else {},
                    "positives": list(positives[g]), "image_source": source}
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            g += 1
            yield sample


def write_shards(data: Domain | MultiDomain | Sequence[Domain], out_dir: str | Path, *, max_count: int = 10000,
                 max_size: int = 1 << 30, positives: Sequence[Sequence[str]] | None = None,
                 images: str = "none", image_size: int = 256, max_len: int = 20, overwrite: bool = False,
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
    ``image_size`` px JPEG for every item, see :mod:`megarec.data.images`).
    Returns the shard paths in order.
    """
    if images not in IMAGE_MODES:
        raise DataError(f"images must be one of {IMAGE_MODES}, got {images!r}")
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
        for sample in tqdm(_samples(domains, positives, images, image_size), total=num_items,
                           desc="build-shards", unit="item", disable=not progress):
            sink.write(sample)
            counts[sink.fname] = counts.get(sink.fname, 0) + 1
    paths = [Path(f) for f in counts]
    manifest = {
        "format": FORMAT,
        "num_items": num_items,
        "images": images,
        "max_len": max_len,
        "domains": [{"name": d.name, "items": d.num_items, "has_text": d.has_text} for d in domains],
        "shards": [{"path": p.name, "count": counts[str(p)], "bytes": p.stat().st_size} for p in paths],
    }
    write_manifest(out, manifest)
    get_logger("megarec.shards").info("wrote %d items into %d shards under %s", num_items, len(paths), out)
    return paths
