"""Read item shards: rank/worker split with equal counts, seeded buffer shuffle, mid-epoch resume.

Epoch plan (computed from the manifest alone, identically on every rank):

1. the shard order is permuted with ``(seed, epoch)`` (kept as is without
   ``shuffle``) and the shards are read as one concatenated stream of N items;
2. the stream is cut into ``S = world_size x num_workers`` contiguous slots of
   exactly ``T`` items each; slot ``rank * num_workers + worker`` belongs to
   that DataLoader worker of that rank. A slot is a run of whole shards plus at
   most a partial shard at each end, so reading stays sequential; a partial
   shard is entered by skipping headers, not data;
3. uneven sizes (``N`` not a multiple of ``S``): ``uneven="pad"`` (default)
   takes ``T = ceil(N / S)`` and wraps around to the start of the stream, so
   every item is seen at least once and ``S*T - N < S`` items twice;
   ``uneven="drop"`` takes ``T = floor(N / S)`` and leaves out the last
   ``N - S*T < S`` items of the epoch's order (a different few each epoch).
   Either way every worker of every rank yields the same number of samples,
   so every rank yields the same number of batches: ZeRO-3 ranks that
   disagree on the number of steps hang;
4. each slot passes through a shuffle buffer seeded with ``(seed, epoch, slot)``.

Images: decoded with PIL to RGB in the reading process (the DataLoader worker).
With ``image_size`` (the model's input resolution), a JPEG is decoded at reduced
scale (``Image.draft``) and resized to exactly that size in torch, giving a
``(3, H, W)`` uint8 tensor (:func:`megarec.data.images.load_image`): 3-4x faster
for 500 px photos and a 224 px model than a full decode followed by PIL's resize,
and decoding is what dominates reading (``tools/bench_data.py``). Shards built
with ``write_shards(image_size=...)`` already store images at that size (the
manifest's ``image_size``): reading them at it decodes at full scale and skips
the resize. Asking for more than the stored size upsamples, which a stored
image's lost detail cannot give back: it is logged as a warning, once per dataset.

Bad samples (a corrupt or truncated tar member, broken JSON, an undecodable
image): with ``on_bad_sample="fail"`` they raise :class:`DataError`; with
``"skip"`` they are counted (``bad_samples``), logged with the rank, and
replaced by the slot's previous good sample (the next good one when none came
yet), so the sample count, and with it the batch count, stays equal across ranks.

Resume: a position is ``(epoch, consumed)`` where ``consumed`` counts what this
rank's DataLoader yielded (batches, or samples without ``batch_size``). The
DataLoader takes them round-robin from its workers, each of which yields the
same number, so every worker knows which of the epoch's worker streams it continues and
how many of its units to skip; skipped
samples are read (they may sit in the shuffle buffer) but not decoded. The
resumed run yields exactly the rest of the uninterrupted epoch, in the same
order, provided world size, workers, batch size and seed are unchanged
(checked by :meth:`ShardDataset.load_state_dict`). With bad samples, a resumed
run substitutes with the last good sample it decoded itself.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megarec.data.domain import DataError
from megarec.data.images import image_hw, load_image, open_rgb
from megarec.data.shard_format import IMAGE_EXTS, load_manifest, unsafe_key
from megarec.data.tar_samples import TarError, iter_samples
from megarec.distributed import get_logger, get_rank, get_world_size

ON_BAD_SAMPLE = ("skip", "fail")
UNEVEN = ("pad", "drop")
_LOGGED_PER_SLOT = 10  # individual bad-sample lines per worker and epoch; the rest go into the summary
_META_FIELDS = {"key": str, "domain": str, "item_id": str, "text": dict, "positives": list}

log = get_logger("megarec.shards")


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of shard ``shard`` starting at sample ``start``."""

    shard: int
    start: int
    count: int


@dataclass(frozen=True)
class _Lost:
    """A sample the tar could not deliver (corrupt header, truncated shard)."""

    shard: str
    reason: str


class _BadSample(Exception):
    pass


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: a permutation seeded by ``(seed, epoch)``, or file order."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def slot_segments(counts: Sequence[int], order: Sequence[int], slot: int, per_slot: int) -> list[Segment]:
    """The segments of slot ``slot``: stream positions ``[slot*per_slot, (slot+1)*per_slot)`` modulo N.

    The stream is the concatenation of the shards in ``order`` (``counts[i]``
    items in shard ``i``); positions past the end wrap around to the start.
    """
    total = sum(counts)
    bounds = [0]
    for s in order:
        bounds.append(bounds[-1] + counts[s])
    segments, pos, left = [], slot * per_slot, per_slot
    while left > 0:
        p = pos % total
        j = next(k for k in range(len(order)) if bounds[k] <= p < bounds[k + 1])
        take = min(left, bounds[j + 1] - p)
        segments.append(Segment(order[j], p - bounds[j], take))
        pos, left = pos + take, left - take
    return segments


def buffer_shuffle(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (deterministic for a seeded ``rng``)."""
    buf: list[Any] = []
    for x in stream:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def decode_sample(key: str, raw: dict[str, bytes], load_images: bool = True,
                  image_size: int | tuple[int, int] | None = None, image_draft: bool = True) -> dict:
    """Turn a raw tar sample into ``{key, domain, item_id, text, positives, image}``; :class:`_BadSample` if broken.

    ``image`` is ``None`` (no image, or ``load_images=False``), an RGB PIL image at its stored
    size, or with ``image_size`` a ``(3, H, W)`` uint8 tensor at that size
    (:func:`~megarec.data.images.load_image`, JPEGs drafted unless ``image_draft=False``).
    """
    if "json" not in raw:
        raise _BadSample("no .json member")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadSample(f"broken JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _BadSample("metadata is not a JSON object")
    for name, kind in _META_FIELDS.items():
        if not isinstance(meta.get(name), kind):
            raise _BadSample(f"metadata field {name!r} missing or not a {kind.__name__}")
    if unsafe_key(key) != meta["key"]:
        raise _BadSample(f"member key {key!r} does not match metadata key {meta['key']!r}")
    exts = [e for e in IMAGE_EXTS if e in raw]
    if meta.get("image_source") and not exts:
        raise _BadSample("image member missing")
    image = None
    if load_images and exts:
        try:
            # Both force the whole decode: truncated data fails here, not later in the model.
            data = raw[exts[0]]
            image = open_rgb(data) if image_size is None else load_image(data, image_size, image_draft)
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise _BadSample(f"undecodable .{exts[0]} image ({type(e).__name__}: {e})") from None
    return {"key": meta["key"], "domain": meta["domain"], "item_id": meta["item_id"], "text": meta["text"],
            "positives": meta["positives"], "image": image}


def collate_items(samples: list[dict]) -> dict:
    """Batch item samples: lists per field, ``has_image`` bool tensor; tensor images are stacked
    (zeros where an item has none), PIL images stay a list (``None`` where missing)."""
    out: dict[str, Any] = {k: [s[k] for s in samples] for k in ("key", "domain", "item_id", "text", "positives")}
    images = [s["image"] for s in samples]
    out["has_image"] = torch.tensor([im is not None for im in images], dtype=torch.bool)
    like = next((im for im in images if isinstance(im, torch.Tensor)), None)
    out["image"] = images if like is None else torch.stack([im if im is not None else torch.zeros_like(like)
                                                            for im in images])
    return out


class ShardDataset(IterableDataset):
    """Item shards as an IterableDataset (see the module docstring for the epoch plan).

    Args:
        path: shard folder or its ``index.json``.
        batch_size: yield ``collate_fn`` batches of this many samples (use
            ``DataLoader(batch_size=None)`` or :class:`ShardLoader`); ``None`` yields samples.
        rank, world_size: default from :mod:`megarec.distributed`.
        num_workers: the DataLoader's ``num_workers`` (checked when iterated).
        uneven: ``"pad"`` or ``"drop"`` (module docstring).
        on_bad_sample: ``"skip"`` (count, log, substitute) or ``"fail"`` (raise).
        load_images: decode images with PIL; ``False`` yields ``image=None``.
        image_size: the model's input resolution, one side or ``(height, width)``: images come
            as ``(3, H, W)`` uint8 tensors of exactly that size, JPEGs decoded at reduced scale
            (module docstring). ``None`` (default): RGB PIL images at their stored size. Shards
            built at a size (``stored_image_size``, from the manifest) read at that size with
            no resize; a larger size is upsampled and logged as a warning.
        image_draft: with ``image_size``, decode JPEGs at reduced DCT scale (default); ``False``
            decodes at full size before resizing (slower, for comparison).
        image_transform: applied to each decoded image (in the worker): the PIL image, or the
            uint8 tensor with ``image_size``.
        unit_transform: ``f(unit, epoch, index) -> unit``, applied to every yielded unit (batch, or
            sample without ``batch_size``) in the reading process (the DataLoader worker), after
            ``collate_fn``; ``index`` is the unit's position in this rank's epoch (what the
            DataLoader yields it as, 0-based), the same with and without workers and after a
            resume. For work that should leave the main process (model-input preparation).

    Iterated in this process, one pass yields the current epoch from the
    current position and then moves on to the next epoch. Through a plain
    DataLoader with workers (which copy the dataset) call :meth:`set_epoch`
    before each epoch, or use :class:`ShardLoader`, which also tracks the
    position for resume. Dict batches get two extra fields, ``worker`` and
    ``bad_samples`` (bad samples this worker met in this pass).
    """

    def __init__(self, path: str | Path, *, batch_size: int | None = None,
                 collate_fn: Callable[[list[dict]], Any] = collate_items, shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 1000, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, uneven: str = "pad", on_bad_sample: str = "skip",
                 load_images: bool = True, image_size: int | tuple[int, int] | None = None,
                 image_draft: bool = True, image_transform: Callable[[Any], Any] | None = None,
                 unit_transform: Callable[[Any, int, int], Any] | None = None) -> None:
        super().__init__()
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.manifest = load_manifest(path)
        self.counts = [s["count"] for s in self.manifest["shards"]]
        self.num_items = int(self.manifest["num_items"])
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.num_workers = num_workers
        self.batch_size, self.collate_fn = batch_size, collate_fn
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.uneven, self.on_bad_sample = uneven, on_bad_sample
        self.load_images, self.image_transform = load_images, image_transform
        self.unit_transform = unit_transform
        self.image_size = None if image_size is None else image_hw(image_size)
        self.image_draft = image_draft
        self.stored_image_size = _stored_size(self.manifest)
        if self.image_size and self.stored_image_size and load_images and any(
                want > have for want, have in zip(self.image_size, self.stored_image_size)):
            log.warning("image_size %s is larger than the %s images these shards store (%s, built with image_size): "
                        "they will be upsampled; rebuild the shards at the model's resolution", self.image_size,
                        self.stored_image_size, path)
        slots = self.world_size * self.workers
        self.per_slot = math.ceil(self.num_items / slots) if uneven == "pad" else self.num_items // slots
        if self.per_slot == 0:
            raise DataError(f"{self.num_items} items cannot fill {slots} rank x worker slots with uneven='drop'")
        self.epoch, self.consumed, self.bad_samples, self._bad_at_start = 0, 0, 0, 0

    # -- sizes -----------------------------------------------------------------
    @property
    def workers(self) -> int:
        """Readers per rank: DataLoader workers, or 1 for the main process."""
        return max(1, self.num_workers)

    def _units_per_slot(self) -> int:
        return self.per_slot if self.batch_size is None else math.ceil(self.per_slot / self.batch_size)

    def __len__(self) -> int:
        """What this rank yields per epoch (batches with ``batch_size``, else samples); equal on every rank."""
        return self.workers * self._units_per_slot()

    # -- position --------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_workers": self.workers,
                "batch_size": self.batch_size, "num_items": self.num_items, "uneven": self.uneven,
                "shuffle": self.shuffle, "buffer_size": self.buffer_size}

    def state_dict(self) -> dict:
        """Position for resume when iterated in this process (``num_workers=0``); else use :class:`ShardLoader`."""
        if self.num_workers > 0:
            raise RuntimeError("with DataLoader workers the position is known to the main loop only: "
                               "iterate through ShardLoader and use its state_dict()")
        return {"epoch": self.epoch, "consumed": self.consumed, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state['epoch']`` after ``state['consumed']`` yielded units."""
        fp = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in fp.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"cannot resume: the shard reader's setup changed (saved, now): {diff}")
        if not 0 <= state["consumed"] <= len(self):
            raise ValueError(f"cannot resume at {state['consumed']} of {len(self)} units per epoch")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    # -- iteration -------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise ValueError(f"ShardDataset(num_workers={self.num_workers}) is read by {workers} DataLoader "
                             "workers; pass the DataLoader's num_workers to the dataset")
        # The DataLoader takes unit i from its worker i % workers, starting again at worker 0 after a
        # restart; so after `consumed` units, DataLoader worker `worker` plays the part of the epoch's
        # worker `role`, which has already delivered `done` units.
        role = (worker + self.consumed) % workers
        done = max(0, (self.consumed - role + workers - 1) // workers)
        slot = self.rank * workers + role
        skip = min(self.per_slot, done * (self.batch_size or 1))
        order = shard_order(len(self.counts), self.seed, self.epoch, self.shuffle)
        stream: Iterator[Any] = self._raw(slot_segments(self.counts, order, slot, self.per_slot))
        if self.shuffle:
            stream = buffer_shuffle(stream, self.buffer_size, random.Random(f"buffer/{self.seed}/{self.epoch}/{slot}"))
        self._bad_at_start = self.bad_samples
        samples = self._decoded(stream, skip, f"epoch {self.epoch} rank {self.rank} worker {worker}")
        units = samples if self.batch_size is None else self._batches(samples)
        start, epoch = self.consumed, self.epoch
        for k, unit in enumerate(units):
            if self.unit_transform is not None:   # this unit is the DataLoader's (start + k*workers + worker)-th
                unit = self.unit_transform(unit, epoch, start + k * workers + worker)
            if info is None:
                self.consumed += 1
            yield unit
        if info is None:  # read in this process: the epoch is done, the next iteration runs the next one
            self.set_epoch(self.epoch + 1)

    def _raw(self, segments: list[Segment]) -> Iterator[tuple[str, dict] | _Lost]:
        """Exactly ``sum(count)`` entries: raw samples, or :class:`_Lost` for what the tar could not give."""
        for seg in segments:
            path = self.manifest["shards"][seg.shard]["path"]
            got, reason = 0, ""
            try:
                for sample in iter_samples(path, skip=seg.start):
                    if got == seg.count:
                        break
                    got += 1
                    yield sample
            except (TarError, OSError) as e:
                reason = str(e)
            if got < seg.count:
                reason = reason or f"{path}: tar ends after {seg.start + got} samples, manifest says " \
                                   f"{self.manifest['shards'][seg.shard]['count']}"
                yield from (_Lost(path, reason) for _ in range(seg.count - got))

    def _decoded(self, stream: Iterator[Any], skip: int, where: str) -> Iterator[dict]:
        """Decode after skipping ``skip`` entries; bad samples fail or are substituted (module docstring)."""
        last_good, pending, bad_here = None, 0, 0
        for i, entry in enumerate(stream):
            if i < skip:
                continue
            try:
                if isinstance(entry, _Lost):
                    raise _BadSample(entry.reason)
                sample = decode_sample(*entry, load_images=self.load_images, image_size=self.image_size,
                                       image_draft=self.image_draft)
            except _BadSample as e:
                what = "lost sample" if isinstance(entry, _Lost) else f"bad sample {entry[0]!r}"
                if self.on_bad_sample == "fail":
                    raise DataError(f"{what}: {e} (on_bad_sample='fail')") from None
                self.bad_samples += 1
                bad_here += 1
                if bad_here <= _LOGGED_PER_SLOT:
                    log.warning("%s skipped (%s): %s; %d bad samples so far", what, where, e, self.bad_samples)
                if last_good is None:
                    pending += 1
                else:
                    yield dict(last_good)
                continue
            if self.image_transform is not None and sample["image"] is not None:
                sample["image"] = self.image_transform(sample["image"])
            for _ in range(pending):
                yield dict(sample)
            pending, last_good = 0, sample
            yield sample
        if bad_here:
            log.warning("%s: %d bad samples skipped and replaced by repeats (%d in total)", where, bad_here,
                        self.bad_samples)
        if pending:
            raise DataError(f"{where}: all {pending} remaining samples of this rank's part are bad; nothing to "
                            "substitute them with")

    def _batches(self, samples: Iterator[dict]) -> Iterator[Any]:
        batch: list[dict] = []
        for s in samples:
            batch.append(s)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list[dict]) -> Any:
        out = self.collate_fn(batch)
        if isinstance(out, dict):  # lets ShardLoader sum bad samples over worker processes
            info = get_worker_info()
            out["worker"] = info.id if info else 0
            out["bad_samples"] = self.bad_samples - self._bad_at_start  # this worker, this pass
        return out


def _stored_size(manifest: dict) -> tuple[int, int] | None:
    """The ``(height, width)`` images were resized to when the shards were built; ``None``: as on disk."""
    size = manifest.get("image_size")
    if size is None:
        return None
    try:
        return image_hw(tuple(size) if isinstance(size, list) else size)
    except ValueError:
        raise DataError(f"shard manifest: 'image_size' must be null or [height, width], got {size!r}") from None


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """A DataLoader over a batched :class:`ShardDataset` that knows its position.

    Iterating runs one epoch (the current one, from the current position) and
    then moves to the next epoch; ``state_dict()`` at any point, saved with a
    checkpoint and given to ``load_state_dict()`` in a restarted run, makes the
    next iteration yield exactly the batches not yet seen in that epoch.
    ``bad_samples`` sums the bad samples found by every worker of this rank.
    """

    def __init__(self, dataset: ShardDataset, **dataloader_kwargs: Any) -> None:
        if dataset.batch_size is None:
            raise ValueError("ShardLoader needs ShardDataset(batch_size=...)")
        self.dataset = dataset
        self.kwargs = dataloader_kwargs
        self.epoch, self.consumed = dataset.epoch, dataset.consumed
        self.bad_samples = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, **self.dataset._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.epoch, self.consumed = self.dataset.epoch, self.dataset.consumed

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        ds.epoch, ds.consumed = self.epoch, self.consumed  # workers copy the dataset with this position
        loader = DataLoader(ds, batch_size=None, num_workers=ds.num_workers, collate_fn=_identity, **self.kwargs)
        base, per_worker = self.bad_samples, {}
        for batch in loader:
            self.consumed += 1
            if isinstance(batch, dict) and "bad_samples" in batch:
                per_worker[batch["worker"]] = batch["bad_samples"]
                self.bad_samples = base + sum(per_worker.values())
            yield batch
        if self.bad_samples > base:
            log.warning("epoch %d: %d bad samples skipped on rank %d", self.epoch, self.bad_samples - base, ds.rank)
        self.epoch, self.consumed = self.epoch + 1, 0
