"""Items per second: WebDataset item shards vs one JSON + one JPEG file per item, images at model resolution.

    python tools/bench_data.py --quick --json bench_data.json
        [--data PATH ...] [--items N] [--source-size 500] [--model-size 224] [--texture 5]

What a training job needs from each item is its metadata and its image as the
model's input: RGB at the model's fixed resolution (``--model-size``, e.g. 224
for a Qwen2-VL-style encoder), as a ``(3, H, W)`` uint8 tensor. Both layouts
hold byte-identical content. Each item gets a ``--source-size`` px placeholder
photo (default 500 x 500: the size of Amazon's "large" product images; their
hi-res ones are ~1500) with fine grain (``--texture``) so that the JPEG weighs
what a product photo does (~48 KB at 500 px, quality 90). The images are
written as files first (as ``megarec download-images`` leaves them), shards are
built from them (``build-shards --images files``), and each item's JSON is
copied out of the shards next to its image.

Two decoders, each giving the same ``(3, H, W)`` uint8 tensor:

- ``naive``: what public code does per item,
  ``Image.open(f).convert("RGB").resize((W, H))`` (PIL's bicubic) then to a
  tensor (as torchvision's ``PILToTensor``);
- ``fast``: :func:`megarec.data.images.load_image`: the JPEG decoded at reduced
  DCT scale (``Image.draft``), then torch's antialiased uint8 bicubic resize.

Rows (best of ``--repeats`` rounds, in each of which the decoding readers take
turns reading 10 items each, so that load swings on a shared machine hit them
alike; wall time, with CPU time as a cross-check; torch limited to 1 thread as in
a DataLoader worker; both layouts read warm from the page cache, which cannot be
dropped here, after one warm-up read of all bytes):

- ``files, naive decode``: the baseline. Per item in shuffled order (what a
  shuffled map-style dataset does): open + ``json.load`` the JSON, naive decode;
- ``files, fast decode``: the same files with the fast decoder;
- ``shards, naive decode``: ``ShardDataset`` (shuffle buffer, checksummed tar
  parsing, JSON parse, bad-sample bookkeeping) with the naive decoder;
- ``shards, fast decode``: ``ShardDataset(image_size=...)``: our pipeline;
- ``*, no decode`` / ``*, bytes only``: the format's own costs (JSON parsed and
  image bytes read / raw bytes only);
- ``memory, ...``: decoders alone on the JPEG bytes in memory (the floor that
  both layouts share), splitting the fast decoder's gain into drafting and
  torch's resize;
- ``*, N workers`` (not with ``--quick``): a DataLoader with N worker processes
  (files: map-style, shuffled, naive decode; shards: ``ShardLoader``, fast decode);
- ``prepared shards, fast decode``: shards built at the model's resolution
  (``write_shards(image_size=...)`` / ``build-shards --image-size``): every
  image resized once at build time the way the reader would, and re-encoded
  (JPEG quality 95, 4:4:4), as img2dataset prepares shards; read with
  ``ShardDataset(image_size=...)``, which then decodes a small file and skips
  the resize. The same ``(3, H, W)`` tensors as the other rows, but these shards
  no longer hold the original image (a second lossy encoding; another
  resolution needs a rebuild), so the layouts no longer hold the same bytes.

``summary.shards_speedup`` = shards with the fast decoder / files with the naive
decoder, both layouts holding the original images (like for like: our pipeline
vs the naive one). It is the product of ``decoder_speedup`` (fast / naive
decoder, both on files) and ``format_only_speedup`` (shards / files, both with
the fast decoder). ``shards_speedup_prepared`` = prepared shards / files with
the naive decoder: both yield the model-resolution tensors, from shards built
for that resolution vs from the per-item original files.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import PIL
import PIL.features
import torch
from PIL import Image

from megarec.data.domain import Domain
from megarec.data.images import load_image, open_rgb, placeholder_bytes, resize_uint8
from megarec.data.shards import ShardDataset, ShardLoader, load_manifest, safe_key, write_shards
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


def build_layouts(domains: list[Domain], tmp: Path, source_size: int,
                  texture: int) -> tuple[list[tuple[Path, Path]], list[Domain]]:
    """Images as files, shards built from them, then each item's JSON copied out of the shards.

    Returns the ``(json, jpg)`` path pairs of the per-item layout (and checks that both layouts hold the same
    bytes), and the domains with their image files.
    """
    files = tmp / "files"
    files.mkdir(parents=True)
    with_images = []
    for d in domains:
        paths = []
        for item_id in d.item_ids:
            key = f"{d.name}/{item_id}"
            p = files / f"{safe_key(key)}.jpg"
            p.write_bytes(placeholder_bytes(key, source_size, texture=texture))
            paths.append(str(p))
        with_images.append(Domain(d.name, d.item_ids, d.users, d.sequences, d.item_text, paths, d.source))
    write_shards(with_images, tmp / "shards", max_count=1000, images="files")
    pairs: list[tuple[Path, Path]] = []
    for shard in load_manifest(tmp / "shards")["shards"]:
        for key, sample in iter_samples(shard["path"]):
            j, i = files / f"{key}.json", files / f"{key}.jpg"
            if i.read_bytes() != sample["jpg"]:
                raise RuntimeError(f"{key}: shard image differs from the file")
            j.write_bytes(sample["json"])
            pairs.append((j, i))
    return pairs, with_images


def build_prepared(domains: list[Domain], tmp: Path, hw: tuple[int, int]) -> tuple[Path, float]:
    """Shards of the same items built at the model's resolution (``build-shards --image-size``); build seconds."""
    t = time.perf_counter()
    write_shards(domains, tmp / "shards_prepared", max_count=1000, images="files", image_size=hw)
    return tmp / "shards_prepared", time.perf_counter() - t


# ----------------------------------------------------------------------------- decoders
def naive_resize(image: Image.Image, hw: tuple[int, int]) -> torch.Tensor:
    """PIL's resize (bicubic, its default) then to a (3, H, W) uint8 tensor, as torchvision's PILToTensor does."""
    return torch.from_numpy(np.array(image.resize((hw[1], hw[0])))).permute(2, 0, 1)


def naive_decode(src, hw: tuple[int, int]) -> torch.Tensor:
    with Image.open(src) as im:
        return naive_resize(im.convert("RGB"), hw)


def draft_pil_decode(src, hw: tuple[int, int]) -> torch.Tensor:
    """Reduced-scale JPEG decode, then PIL's resize: isolates what drafting gains."""
    return naive_resize(open_rgb(src, hw), hw)


def full_torch_decode(src, hw: tuple[int, int]) -> torch.Tensor:
    """Full decode, then torch's resize: isolates what torch's resize gains."""
    return resize_uint8(open_rgb(src), hw)


def fast_decode(src, hw: tuple[int, int]) -> torch.Tensor:
    return load_image(src, hw)


# ----------------------------------------------------------------------------- readers
# Each reader is a generator over one pass that yields the number of items each step delivered (1, or a
# batch's size), so that the timing loop can interleave readers in small blocks of steps.
Reader = Callable[[int], Iterator[int]]


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def read_files(pairs: list[tuple[Path, Path]], decode: Callable | None, hw: tuple[int, int],
               seed: int) -> Iterator[int]:
    for k in _shuffled(len(pairs), seed):
        jpath, ipath = pairs[k]
        with open(jpath, "rb") as fh:
            meta = json.load(fh)
        if decode is None:
            with open(ipath, "rb") as fh:
                ok = len(fh.read()) > 0
        else:
            ok = decode(ipath, hw).shape == (3, *hw)
        yield int(isinstance(meta, dict) and ok)


def read_shards(shard_dir: Path, mode: str, hw: tuple[int, int], seed: int) -> Iterator[int]:
    """``mode``: "fast" (ShardDataset(image_size)), "naive" (full decode, PIL resize), "none" (no decode)."""
    if mode == "fast":
        ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, image_size=hw)
    elif mode == "naive":
        ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, image_transform=lambda im: naive_resize(im, hw))
    else:
        ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, load_images=False)
    for s in ds:
        yield int(s["image"] is None if mode == "none" else s["image"].shape == (3, *hw))


def read_bytes_files(pairs: list[tuple[Path, Path]], seed: int) -> Iterator[int]:
    for k in _shuffled(len(pairs), seed):
        for path in pairs[k]:
            with open(path, "rb") as fh:
                fh.read()
        yield 1


def read_bytes_shards(shard_dir: Path) -> Iterator[int]:
    for s in load_manifest(shard_dir)["shards"]:
        for _ in iter_samples(s["path"]):
            yield 1


def decode_memory(jpegs: list[bytes], decode: Callable, hw: tuple[int, int]) -> Iterator[int]:
    for b in jpegs:
        yield int(decode(io.BytesIO(b), hw).shape == (3, *hw))


class _FileDataset:
    """Map-style dataset over the per-item layout, naive decode (for the DataLoader rows)."""

    def __init__(self, pairs, hw):
        self.pairs, self.hw = pairs, hw

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        jpath, ipath = self.pairs[k]
        with open(jpath, "rb") as fh:
            meta = json.load(fh)
        return meta, naive_decode(ipath, self.hw)


def _as_list(batch):
    return batch


def loader_files(pairs, hw, workers: int, seed: int) -> Iterator[int]:
    from torch.utils.data import DataLoader

    dl = DataLoader(_FileDataset(pairs, hw), batch_size=64, shuffle=True, num_workers=workers,
                    collate_fn=_as_list, generator=torch.Generator().manual_seed(seed))
    for b in dl:
        yield len(b)


def loader_shards(shard_dir: Path, hw, workers: int, seed: int) -> Iterator[int]:
    ds = ShardDataset(shard_dir, rank=0, world_size=1, seed=seed, num_workers=workers, batch_size=64, image_size=hw)
    for b in ShardLoader(ds):
        yield len(b["key"])


BLOCK = 10  # items per turn for the decoding rows: 30-120 ms here, short against load swings
WHOLE_PASSES = 5  # passes per round for the cheap rows (tens of ms each)


def _block(name: str, layout: str, decoder: str, memory_share: float) -> int | None:
    """Turn size for a row: whole passes for the cheap and DataLoader rows; the memory rows (a subset
    of the items) take proportionally smaller turns, so that every decoding row spans the whole round."""
    if decoder == "none" or "workers" in name:
        return None
    return max(1, round(BLOCK * memory_share)) if layout == "memory" else BLOCK


def timed_interleaved(readers: dict[str, tuple[Reader, int | None]], repeats: int) -> dict[str, dict]:
    """Per reader, its best round out of ``repeats``: ``{"seconds", "cpu_seconds", "items"}``.

    Within a round the decoding readers take turns, ``block`` steps each, until all are done, so
    that load swings on a shared machine hit them alike (blocks are sized so that all of them
    finish together). Readers with ``block=None`` run their whole pass in one turn: the cheap
    rows, whose whole pass is shorter than one scheduler time slice on a loaded machine, and the
    DataLoader rows, whose worker processes would otherwise run ahead while others are timed;
    the cheap rows get ``WHOLE_PASSES`` passes per round.
    ``cpu_seconds`` is this process's CPU time (user + system), which waiting for a core on a
    loaded machine does not inflate; it misses DataLoader workers' time.
    """
    best: dict[str, dict] = {name: {"seconds": float("inf")} for name in readers}

    def keep(name: str, got: dict) -> None:
        if got["seconds"] < best[name]["seconds"]:
            best[name] = got

    for r in range(repeats):
        whole = [name for name, (_, block) in readers.items() if block is None]
        passes = {name: iter(fn(r)) for name, (fn, block) in readers.items() if block is not None}
        got = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "items": 0} for name in passes}
        while passes:
            for name in list(passes):
                block = readers[name][1]
                t, c = time.perf_counter(), time.process_time()
                steps = list(itertools.islice(passes[name], block))
                got[name]["seconds"] += time.perf_counter() - t
                got[name]["cpu_seconds"] += time.process_time() - c
                got[name]["items"] += sum(steps)
                if len(steps) < block:
                    del passes[name]
                    keep(name, got[name])
        for name in whole:  # cheap rows: several passes per round (one preemption would swamp one pass)
            for _ in range(1 if "workers" in name else WHOLE_PASSES):
                t, c = time.perf_counter(), time.process_time()
                items = sum(readers[name][0](r))
                keep(name, {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
                            "items": items})
    return best


def fidelity(jpegs: list[bytes], other: list[bytes], hw: tuple[int, int], limit: int = 50) -> float:
    """Mean absolute difference (grey levels) between the fast decoder's output on ``other`` and the naive
    decoder's on ``jpegs`` (the same images)."""
    diffs = [(fast_decode(io.BytesIO(b), hw).int() - naive_decode(io.BytesIO(a), hw).int()).abs().float().mean()
             for a, b in zip(jpegs[:limit], other[:limit])]
    return float(torch.stack(diffs).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="*", default=[], help="domain paths (default: the embedded sample)")
    ap.add_argument("--quick", action="store_true", help="250 items, 2 rounds, no DataLoader rows (< 1 min)")
    ap.add_argument("--items", type=int, default=None, help="items to use (default 250 quick, 2,000 full)")
    ap.add_argument("--source-size", type=int, default=500, help="stored image side (Amazon 'large': ~500)")
    ap.add_argument("--model-size", type=int, default=224, help="the model's input side")
    ap.add_argument("--texture", type=int, default=5, help="placeholder grain amplitude (5: ~48 KB per 500 px JPEG)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2 quick, 3 full)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the worker rows")
    ap.add_argument("--tmp", default=None, help="folder for the temporary shards and files (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    items = args.items or (250 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    hw = (args.model_size, args.model_size)
    torch.set_num_threads(1)  # as in DataLoader workers; and the naive decoder is single-threaded

    t0 = time.perf_counter()
    domains = load_domains(args.data, items)
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        pairs, with_images = build_layouts(domains, tmp, args.source_size, args.texture)
        prepared, prepared_build_s = build_prepared(with_images, tmp, hw)
        build_s = time.perf_counter() - t0
        n = len(pairs)
        # The decoders alone are timed on a subset: a rate per item needs no more, and it keeps --quick short.
        jpegs = [p[1].read_bytes() for p in pairs[:150 if args.quick else 500]]
        for warm_up in (read_bytes_files(pairs, 0), read_bytes_shards(shards), read_bytes_shards(prepared)):
            sum(warm_up)  # both layouts into the page cache
        readers: dict[str, tuple[str, str, Reader]] = {
            "files, naive decode": ("files", "naive", lambda s: read_files(pairs, naive_decode, hw, s)),
            "files, fast decode": ("files", "fast", lambda s: read_files(pairs, fast_decode, hw, s)),
            "shards, naive decode": ("shards", "naive", lambda s: read_shards(shards, "naive", hw, s)),
            "shards, fast decode": ("shards", "fast", lambda s: read_shards(shards, "fast", hw, s)),
            "files, no decode": ("files", "none", lambda s: read_files(pairs, None, hw, s)),
            "shards, no decode": ("shards", "none", lambda s: read_shards(shards, "none", hw, s)),
            "files, bytes only": ("files", "none", lambda s: read_bytes_files(pairs, s)),
            "shards, bytes only": ("shards", "none", lambda s: read_bytes_shards(shards)),
            "memory, naive decode": ("memory", "naive", lambda s: decode_memory(jpegs, naive_decode, hw)),
            "memory, draft + PIL resize": ("memory", "draft+PIL", lambda s: decode_memory(jpegs, draft_pil_decode, hw)),
            "memory, fast decode": ("memory", "fast", lambda s: decode_memory(jpegs, fast_decode, hw)),
            "prepared shards, fast decode": ("prepared shards", "fast",
                                             lambda s: read_shards(prepared, "fast", hw, s)),
        }
        if not args.quick:
            w = args.workers
            readers["memory, full + torch resize"] = ("memory", "full+torch",
                                                      lambda s: decode_memory(jpegs, full_torch_decode, hw))
            readers[f"files, naive decode, {w} workers"] = ("files", "naive", lambda s: loader_files(pairs, hw, w, s))
            readers[f"shards, fast decode, {w} workers"] = ("shards", "fast", lambda s: loader_shards(shards, hw, w, s))
        best = timed_interleaved({name: (fn, _block(name, layout, decoder, len(jpegs) / n))
                                  for name, (layout, decoder, fn) in readers.items()}, repeats)
        rows = []
        for name, (layout, decoder, _) in readers.items():
            secs, cpu, got = best[name]["seconds"], best[name]["cpu_seconds"], best[name]["items"]
            want = len(jpegs) if layout == "memory" else n
            # ShardLoader pads each worker's part to equal length (uneven="pad"): up to workers - 1 repeats
            extra = args.workers - 1 if name.startswith("shards") and "workers" in name else 0
            if not want <= got <= want + extra:
                raise RuntimeError(f"{name}: read {got} items, expected {want}")
            in_process = "workers" not in name  # CPU time misses the DataLoader workers' time
            rows.append({"reader": name, "layout": layout, "decoder": decoder, "items": got,
                         "seconds": round(secs, 4), "items_per_s": round(got / secs, 1),
                         "cpu_seconds": round(cpu, 4) if in_process else None,
                         "items_per_cpu_s": round(got / max(cpu, 1e-9), 1) if in_process else None})
        shard_bytes = sum(s["bytes"] for s in load_manifest(shards)["shards"])
        prepared_manifest = load_manifest(prepared)
        if prepared_manifest["image_size"] != list(hw):
            raise RuntimeError(f"prepared shards store {prepared_manifest['image_size']}, expected {list(hw)}")
        small = {k: sample["jpg"] for s in prepared_manifest["shards"] for k, sample in iter_samples(s["path"])}
        small = [small[p[1].stem] for p in pairs[:len(jpegs)]]
        mad, mad_prepared = fidelity(jpegs, jpegs, hw), fidelity(jpegs, small, hw)
        mad_prepared_fast = float(torch.stack([(fast_decode(io.BytesIO(b), hw).int() - fast_decode(io.BytesIO(a), hw)
                                                .int()).abs().float().mean() for a, b in zip(jpegs[:50], small)]).mean())
        prepared_bytes = sum(s["bytes"] for s in prepared_manifest["shards"])
        with Image.open(pairs[0][1]) as im:
            im.draft("RGB", (hw[1], hw[0]))
            drafted = list(im.size)
        mean_jpeg = round(sum(p[1].stat().st_size for p in pairs) / n)

    rate = {r["reader"]: r["items_per_s"] for r in rows}
    cpu_rate = {r["reader"]: r["items_per_cpu_s"] for r in rows}
    ratio = lambda a, b: round(rate[a] / rate[b], 3)  # noqa: E731
    summary = {
        "shards_speedup": ratio("shards, fast decode", "files, naive decode"),
        # The same from CPU time: a cross-check that load swings did not make the figure.
        "shards_speedup_cpu_time": round(cpu_rate["shards, fast decode"] / cpu_rate["files, naive decode"], 3),
        "format_only_speedup": ratio("shards, fast decode", "files, fast decode"),
        "format_only_speedup_naive_decoder": ratio("shards, naive decode", "files, naive decode"),
        "decoder_speedup": ratio("files, fast decode", "files, naive decode"),
        "decoder_speedup_memory": ratio("memory, fast decode", "memory, naive decode"),
        "draft_speedup_memory": ratio("memory, draft + PIL resize", "memory, naive decode"),
        "torch_resize_speedup_memory": ratio("memory, fast decode", "memory, draft + PIL resize"),
        "shards_speedup_no_decode": ratio("shards, no decode", "files, no decode"),
        "shards_speedup_bytes_only": ratio("shards, bytes only", "files, bytes only"),
        # Share of the shard pipeline's time spent decoding; and what a reader with free I/O and parsing
        # plus the fast decoder would reach against the baseline (the ceiling of shards_speedup here).
        "decode_share_of_shards_time": ratio("shards, fast decode", "memory, fast decode"),
        "speedup_ceiling_fast_decoder": ratio("memory, fast decode", "files, naive decode"),
        "fast_vs_naive_mean_abs_diff": round(mad, 3),
        # Shards built at the model's resolution (build-shards --image-size) vs the per-item original files.
        "shards_speedup_prepared": ratio("prepared shards, fast decode", "files, naive decode"),
        "shards_speedup_prepared_cpu_time": round(cpu_rate["prepared shards, fast decode"]
                                                  / cpu_rate["files, naive decode"], 3),
        "prepared_vs_naive_mean_abs_diff": round(mad_prepared, 3),
        "prepared_vs_fast_mean_abs_diff": round(mad_prepared_fast, 3),  # the re-encoding's own loss
        "mean_prepared_jpeg_bytes": round(sum(map(len, small)) / len(small)),
        "prepared_build_items_per_s": round(n / prepared_build_s, 1),
        "items": n,
        "source_size": args.source_size,
        "model_size": args.model_size,
        "drafted_size": drafted,
        "mean_jpeg_bytes": mean_jpeg,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.quick:
        w = args.workers
        summary["shards_speedup_workers"] = ratio(f"shards, fast decode, {w} workers",
                                                  f"files, naive decode, {w} workers")
        summary["torch_resize_speedup_full_decode_memory"] = ratio("memory, full + torch resize",
                                                                   "memory, naive decode")

    from megarec.formatting import format_table
    print(format_table(rows, ["reader", "decoder", "items", "seconds", "items_per_s", "items_per_cpu_s"]))
    print(f"shards_speedup (shards + fast decode vs files + naive decode): {summary['shards_speedup']:.2f}x "
          f"= decoder {summary['decoder_speedup']:.2f}x x format {summary['format_only_speedup']:.2f}x "
          f"(format with the naive decoder: {summary['format_only_speedup_naive_decoder']:.2f}x; "
          f"no decode: {summary['shards_speedup_no_decode']:.2f}x; bytes only: "
          f"{summary['shards_speedup_bytes_only']:.2f}x); from CPU time: {summary['shards_speedup_cpu_time']:.2f}x")
    print(f"decoder in memory: draft {summary['draft_speedup_memory']:.2f}x, then torch resize "
          f"{summary['torch_resize_speedup_memory']:.2f}x; fast vs naive output: mean |diff| "
          f"{summary['fast_vs_naive_mean_abs_diff']:.2f} grey levels; decoding is "
          f"{summary['decode_share_of_shards_time']:.0%} of the shard pipeline's time")
    print(f"shards_speedup_prepared (shards built with --image-size {args.model_size}, "
          f"{summary['mean_prepared_jpeg_bytes']:,} B per JPEG, vs files + naive decode): "
          f"{summary['shards_speedup_prepared']:.2f}x (CPU time {summary['shards_speedup_prepared_cpu_time']:.2f}x); "
          f"mean |diff| vs naive {summary['prepared_vs_naive_mean_abs_diff']:.2f}, vs the fast decoder on the "
          f"originals {summary['prepared_vs_fast_mean_abs_diff']:.2f} grey levels; built at "
          f"{summary['prepared_build_items_per_s']:,.0f} items/s")
    print(f"{n:,} items, {args.source_size} px JPEGs of {summary['mean_jpeg_bytes']:,} B on average, drafted to "
          f"{drafted[0]}x{drafted[1]} for a {args.model_size} px model, {shard_bytes / 2**20:.1f} MiB of shards "
          f"({prepared_bytes / 2**20:.1f} MiB prepared); "
          f"build {build_s:.1f} s, total {time.perf_counter() - t0:.1f} s; both layouts read warm, 1 torch thread")
    if args.json:
        result = {"benchmark": "bench_data", "quick": args.quick, "repeats": repeats,
                  "machine": {"python": platform.python_version(), "torch": torch.__version__,
                              "pillow": PIL.__version__, "libjpeg_turbo": PIL.features.check_feature("libjpeg_turbo"),
                              "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]},
                  "rows": rows, "summary": summary}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
