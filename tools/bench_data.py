"""Items per second: WebDataset item shards vs one JSON + one JPEG file per item.

    python tools/bench_data.py --quick --json bench_data.json [--data PATH ...] [--items N]

Both layouts hold byte-identical content: the naive layout is written by
copying every member out of the shards (``<key>.json`` + ``<key>.jpg`` per
item, all in one folder). Every item gets a placeholder image
(:mod:`megarec.data.images`, 256 x 256 JPEG by default), so images are
decoded in every "decoded" row.

Rows (each is the best of ``--repeats`` timed passes after one warm-up pass;
both layouts are read warm from the page cache, which cannot be dropped here):

- ``files``: for each item in a random order (what a shuffled map-style
  dataset does): open + read + ``json.loads`` the JSON, open the JPEG and
  decode it with PIL (``convert("RGB")``), in one process;
- ``shards``: ``ShardDataset`` (shuffle buffer, checksummed tar parsing, the
  same JSON parse and PIL decode, substitution bookkeeping) in one process;
- ``*, no decode``: the same without the PIL decode (files: the JPEG bytes are
  read; shards: ``load_images=False``, the bytes are read but not decoded);
- ``decode only``: PIL decode of the same JPEGs from memory: the floor both
  layouts share;
- ``*, 2 workers`` (not with ``--quick``): DataLoader with 2 worker processes
  for each layout (a map-style dataset over the files, shuffled).

``summary.shards_speedup`` is shards / files items per second with images
decoded, one process each (like for like).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from megarec.data.domain import Domain
from megarec.data.shards import ShardDataset, load_manifest, write_shards
from megarec.data.tar_samples import iter_samples


def load_domains(paths: list[str], max_items: int) -> list[Domain]:
    """Read the domains and keep at most ``max_items`` items in total (users keep only kept items)."""
    from megarec.data.readers import read_domain
    from megarec.data.sample import sample_paths

    domains, left = [], max_items
    for p in paths or [str(p) for p in sample_paths()]:
        d = read_domain(p)
        n = min(left, d.num_items)
        if n <= 0:
            break
        keep = [s[s < n] for s in d.sequences]
        domains.append(Domain(d.name, d.item_ids[:n], d.users, keep,
                              d.item_text[:n] if d.item_text is not None else None, None, d.source))
        left -= n
    return domains


def write_naive(shard_dir: Path, out: Path) -> list[tuple[Path, Path]]:
    """Copy every sample out of the shards as ``<key>.json`` + ``<key>.jpg`` files."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for shard in load_manifest(shard_dir)["shards"]:
        for key, sample in iter_samples(shard["path"]):
            j, i = out / f"{key}.json", out / f"{key}.jpg"
            j.write_bytes(sample["json"])
            i.write_bytes(sample["jpg"])
            pairs.append((j, i))
    return pairs


def read_files(pairs: list[tuple[Path, Path]], decode: bool, seed: int) -> int:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = 0
    for k in order:
        jpath, ipath = pairs[k]
        with open(jpath, "rb") as fh:
            meta = json.loads(fh.read())
        if decode:
            with Image.open(ipath) as im:
                image = im.convert("RGB")
        else:
            with open(ipath, "rb") as fh:
                image = fh.read()
        n += meta is not None and image is not None
    return n


def read_shards(shard_dir: Path, decode: bool, seed: int) -> int:
    ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, load_images=decode)
    return sum(1 for _ in ds)


def read_bytes_files(pairs: list[tuple[Path, Path]], seed: int) -> int:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    for k in order:
        for path in pairs[k]:
            with open(path, "rb") as fh:
                fh.read()
    return len(order)


def read_bytes_shards(shard_dir: Path) -> int:
    return sum(1 for s in load_manifest(shard_dir)["shards"] for _ in iter_samples(s["path"]))


def decode_only(jpegs: list[bytes]) -> int:
    for b in jpegs:
        with Image.open(io.BytesIO(b)) as im:
            im.convert("RGB")
    return len(jpegs)


class _FileDataset:
    """Map-style dataset over the naive layout (for the DataLoader rows)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        jpath, ipath = self.pairs[k]
        with open(jpath, "rb") as fh:
            meta = json.loads(fh.read())
        with Image.open(ipath) as im:
            return meta, im.convert("RGB")


def _ident(x):
    return x


def loader_files(pairs, workers: int, seed: int) -> int:
    from torch.utils.data import DataLoader
    import torch

    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(_FileDataset(pairs), batch_size=None, shuffle=True, num_workers=workers, collate_fn=_ident,
                    generator=g)
    return sum(1 for _ in dl)


def loader_shards(shard_dir: Path, workers: int, seed: int) -> int:
    from torch.utils.data import DataLoader

    ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, num_workers=workers)
    return sum(1 for _ in DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_ident))


def timed_interleaved(readers: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Best wall time per reader over ``repeats`` rounds, each round running every reader once
    (after one warm-up round), so that load changes on a shared machine hit all readers alike."""
    best = {name: (float("inf"), 0) for name in readers}
    for r in range(repeats + 1):
        for name, fn in readers.items():
            t = time.perf_counter()
            n = fn(r)
            secs = time.perf_counter() - t
            if r > 0 and secs < best[name][0]:
                best[name] = (secs, n)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="*", default=[], help="domain paths (default: the embedded sample)")
    ap.add_argument("--quick", action="store_true", help="2,000 items, 3 rounds, no DataLoader rows (< 1 min)")
    ap.add_argument("--items", type=int, default=None, help="items to use (default 2,000 quick, 10,000 full)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the worker rows")
    ap.add_argument("--tmp", default=None, help="folder for the temporary shards and files (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    items = args.items or (2000 if args.quick else 10000)
    repeats = args.repeats or (3 if args.quick else 5)

    domains = load_domains(args.data, items)
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_shards(domains, tmp / "shards", max_count=1000, images="placeholder", image_size=args.image_size)
        pairs = write_naive(tmp / "shards", tmp / "files")
        build_s = time.perf_counter() - t
        jpegs = [p[1].read_bytes() for p in pairs]
        n = len(pairs)
        readers = {
            "files": ("files", True, lambda s: read_files(pairs, True, s)),
            "shards": ("shards", True, lambda s: read_shards(tmp / "shards", True, s)),
            "files, no decode": ("files", False, lambda s: read_files(pairs, False, s)),
            "shards, no decode": ("shards", False, lambda s: read_shards(tmp / "shards", False, s)),
            "files, bytes only": ("files", False, lambda s: read_bytes_files(pairs, s)),
            "shards, bytes only": ("shards", False, lambda s: read_bytes_shards(tmp / "shards")),
            "decode only": ("memory", True, lambda s: decode_only(jpegs)),
        }
        if not args.quick:
            w = args.workers
            readers[f"files, {w} workers"] = ("files", True, lambda s: loader_files(pairs, w, s))
            readers[f"shards, {w} workers"] = ("shards", True, lambda s: loader_shards(tmp / "shards", w, s))
        best = timed_interleaved({name: fn for name, (_, _, fn) in readers.items()}, repeats)
        rows = []
        for name, (layout, decode, _) in readers.items():
            secs, got = best[name]
            if got != n:
                raise RuntimeError(f"{name}: read {got} items, expected {n}")
            rows.append({"reader": name, "layout": layout, "images_decoded": decode, "items": n,
                         "seconds": round(secs, 4), "items_per_s": round(n / secs, 1)})
        shard_bytes = sum(s["bytes"] for s in load_manifest(tmp / "shards")["shards"])

    rate = {r["reader"]: r["items_per_s"] for r in rows}
    summary = {
        "shards_speedup": round(rate["shards"] / rate["files"], 3),
        "shards_speedup_no_decode": round(rate["shards, no decode"] / rate["files, no decode"], 3),
        "shards_speedup_bytes_only": round(rate["shards, bytes only"] / rate["files, bytes only"], 3),
        "decode_share_of_files_time": round(rate["files"] / rate["decode only"], 3),
        # Even a layout with free I/O and parsing decodes the same JPEGs: the ceiling for shards_speedup.
        "speedup_ceiling_decode_bound": round(rate["decode only"] / rate["files"], 3),
        "items": n,
        "image_size": args.image_size,
        "mean_jpeg_bytes": round(sum(map(len, jpegs)) / n),
    }
    if not args.quick:
        w = args.workers
        summary["shards_speedup_workers"] = round(rate[f"shards, {w} workers"] / rate[f"files, {w} workers"], 3)

    from megarec.cli import format_table
    print(format_table(rows, ["reader", "images_decoded", "items", "seconds", "items_per_s"]))
    print(f"shards_speedup (images decoded, 1 process each): {summary['shards_speedup']:.2f}x; "
          f"without decode: {summary['shards_speedup_no_decode']:.2f}x; "
          f"bytes only: {summary['shards_speedup_bytes_only']:.2f}x; ceiling with decode (decode only / files): "
          f"{summary['speedup_ceiling_decode_bound']:.2f}x; "
          f"{n:,} items, {summary['mean_jpeg_bytes']:,} B per JPEG, {shard_bytes / 2**20:.1f} MiB of shards; "
          f"build {build_s:.1f} s; both layouts read warm")
    if args.json:
        result = {"benchmark": "bench_data", "quick": args.quick, "repeats": repeats,
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                  "rows": rows, "summary": summary}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
