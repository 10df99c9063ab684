"""UTGRec tokenizer training's data path: shard batches -> ready model inputs, inside DataLoader workers.

Per batch, in the worker that read it (:class:`TrainBatchMaker`, the shard dataset's ``unit_transform``):

1. a co-occurring positive per anchor, drawn from its training-split positives with
   ``np.random.default_rng([seed, epoch * batches_per_epoch + index, rank])`` where ``index`` is the batch's
   position in the rank's epoch: the same draws with any number of workers and after a resume (with one
   micro-batch per step the stream index is the optimizer step, as before);
2. the positives' images read in one pass per shard (:meth:`~.item_lookup.ItemLookup.image_bytes`: grouped
   by shard, offset order, one open per shard), anchors' images come decoded from the shard reader;
3. images decoded at the sizes the config needs, each straight from the stored bytes (drafted JPEG decode +
   one resize): the encoder's side (``utgrec.encoder.image_size`` rounded to 28, :mod:`~.item_inputs`) and,
   only when the VAE runs during training, the VAE's ``decoder.vae_image_size``;
4. the Qwen2-VL image processor, the encoder prompts and the text decoder's targets (:class:`~.item_inputs.
   ItemPreparer`), and the cached latent rows of every item (:class:`~.latent_cache.LatentCache`).

The main process only moves the (pinned, when a GPU is present) tensors to the device, and runs the VAE when
latents are not cached (``decoder.cache_latents false``). :func:`check_data` fails before any compute when the
config asks for an image loss and the shards hold no image, or a latents file was made with another VAE;
:func:`resolve_latents` makes the catalogue's latent cache once (every rank its slice) when a VAE is
configured. :func:`train_loader` builds the dataset and loader with ``data.num_workers`` /
``data.prefetch_factor``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megarec.data.domain import DataError
from megarec.data.images import open_rgb, resize_uint8
from megarec.distributed import get_logger
from megarec.methods.utgrec.latent_cache import LatentCache

if TYPE_CHECKING:
    from megarec.methods.utgrec.item_inputs import ItemPreparer
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

log = get_logger("megarec.train_tokenizer")


def check_data(cfg: "TrainTokenizerConfig", lookup: "ItemLookup") -> None:
    """Before anything is built or computed: an image loss (``decoder.vae_path`` / ``latents_file``) needs
    shards with images; a given ``latents_file`` must come from this VAE, image size and patch."""
    from megarec.methods.utgrec.latent_cache import check_latent_cache

    d = cfg.utgrec.decoder
    if (d.vae_path or d.latents_file) and lookup.num_images() == 0:
        what = "utgrec.decoder.latents_file" if d.latents_file else "utgrec.decoder.vae_path"
        raise DataError(f"{cfg.data.shards}: no item of the shards has an image, but {what} asks for an image loss; "
                        "rebuild the shards with images (`megarec build-shards --images files|placeholder`) or "
                        f"unset {what}")
    if d.latents_file:
        check_latent_cache(d.latents_file, d.vae_path, d.vae_image_size, d.latent_patch)
    if cfg.utgrec.encoder.backend == "qwen2vl" and lookup.num_images() == 0:
        log.warning("%s: no item has an image; the Qwen2-VL encoder gets text-only prompts", cfg.data.shards)


def resolve_latents(cfg: "TrainTokenizerConfig", latents: Any, lookup: "ItemLookup", device: torch.device) -> Any:
    """The image targets training reads: with a VAE and ``decoder.cache_latents`` the catalogue's latent cache
    (made first when missing, every rank encoding its slice: a collective), else ``latents`` as given."""
    from megarec.methods.utgrec.image_decoder import ImageLatents
    from megarec.methods.utgrec.latent_cache import check_latent_cache, default_cache_path, write_latent_cache

    d = cfg.utgrec.decoder
    if not isinstance(latents, ImageLatents) or not d.cache_latents:
        return latents
    from megarec.distributed import barrier

    path = default_cache_path(cfg.data.shards, d.vae_path, d.vae_image_size, d.latent_patch)
    barrier()   # every rank looks for the file before any could start writing it
    if path.is_file():
        check_latent_cache(path, d.vae_path, d.vae_image_size, d.latent_patch)
        log.info("image targets: cached VAE latents %s", path)
    else:
        log.info("image targets: encoding the catalogue's %d images once into %s", lookup.num_images(), path)
        write_latent_cache(cfg.data.shards, d.vae_path, path, d.vae_image_size, d.latent_patch,
                           batch_size=cfg.export.batch_size, device=device, progress=cfg.train.progress,
                           vae=latents.to(device), lookup=lookup, on_bad_sample=cfg.data.on_bad_sample)
    return LatentCache(path, d.vae_path, d.vae_image_size, d.latent_patch)


class TrainBatchMaker:
    """A shard batch -> ready model inputs (module docstring); picklable, runs in DataLoader workers.

    ``vae_side``: the VAE's image size when the VAE runs during training (``vae_images`` are then returned for
    the main process), else ``None``. ``batches_per_epoch`` (this rank's) is set once the dataset exists."""

    def __init__(self, preparer: "ItemPreparer", lookup: "ItemLookup", *, seed: int, rank: int, text_tokens: int,
                 cache: LatentCache | None = None, vae_side: int | None = None, on_bad_sample: str = "skip",
                 batches_per_epoch: int = 0) -> None:
        self.preparer, self.lookup, self.cache = preparer, lookup, cache
        self.seed, self.rank, self.text_tokens, self.on_bad_sample = seed, rank, text_tokens, on_bad_sample
        self.batches_per_epoch = batches_per_epoch
        self.vae_side = vae_side
        self.sizes = sorted({s for s in ((preparer.side if preparer.qwen else None), vae_side) if s})
        # One size: the shard reader decodes the anchors at it (drafted JPEG, in the worker); two: the anchors
        # are read by key like the positives and decoded once per size from their bytes.
        self.reader_image_size = self.sizes[0] if len(self.sizes) == 1 else None
        self.reader_loads_images = len(self.sizes) == 1

    @classmethod
    def for_config(cls, cfg: "TrainTokenizerConfig", preparer: "ItemPreparer", lookup: "ItemLookup", latents: Any,
                   rank: int) -> "TrainBatchMaker":
        cache = latents if isinstance(latents, LatentCache) else None
        vae_side = cfg.utgrec.decoder.vae_image_size if latents is not None and cache is None else None
        return cls(preparer, lookup, seed=cfg.train.seed, rank=rank, text_tokens=cfg.utgrec.decoder.max_text_tokens,
                   cache=cache, vae_side=vae_side, on_bad_sample=cfg.data.on_bad_sample)

    def positives(self, keys: list[str], epoch: int, index: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch * self.batches_per_epoch + index, self.rank])
        return [self.lookup.sample_positive(k, rng) for k in keys]

    def _decode(self, i: int, data: bytes | None) -> dict[int, torch.Tensor] | None:
        if data is None:
            return None
        try:
            if len(self.sizes) == 1:
                return {self.sizes[0]: self.lookup.decode(i, data, self.sizes[0])}
            try:
                im = open_rgb(data, max(self.sizes))
            except Exception as e:  # PIL raises many types
                raise DataError(f"image of {self.lookup.keys[i]!r} is undecodable ({e})") from None
            return {s: resize_uint8(im, s) for s in self.sizes}
        except DataError:
            if self.on_bad_sample == "fail":
                raise
            return {}

    def __call__(self, batch: dict, epoch: int, index: int) -> dict:
        lk = self.lookup
        anchors = [lk.position(k) for k in batch["key"]]
        pos = self.positives(list(batch["key"]), epoch, index)
        items = anchors + pos
        keys = [lk.keys[i] for i in items]
        texts = [lk.text(i) for i in items]
        images: list[dict[int, torch.Tensor] | None] = [None] * len(items)
        if self.sizes:
            if self.reader_loads_images:   # anchors decoded by the shard reader, positives here
                s = self.sizes[0]
                for j, h in enumerate(batch["has_image"].tolist()):
                    images[j] = {s: batch["image"][j]} if h else None
                todo = list(range(len(anchors), len(items)))
            else:
                todo = list(range(len(items)))
            for j, data in zip(todo, lk.image_bytes([items[j] for j in todo])):
                images[j] = self._decode(items[j], data)
        bad = sum(1 for im in images if im == {})
        images = [im or None for im in images]
        p = self.preparer
        enc_images = [im[p.side] if im else None for im in images] if p.qwen else None
        out = {"key": list(batch["key"]), "prepared": True, "enc": p.encoder_inputs(texts, enc_images),
               "latents": None, "vae_images": None, "bad_images": bad,
               "has": torch.tensor([im is not None for im in images], dtype=torch.bool)}
        out["ids"], out["mask"] = p.text_targets(texts, self.text_tokens)
        if self.cache is not None:
            out["latents"], out["has"] = self.cache.get(keys)
        elif self.vae_side:
            s = self.vae_side
            out["vae_images"] = torch.stack([im[s] if im else torch.zeros(3, s, s, dtype=torch.uint8)
                                             for im in images])
        for k in ("worker", "bad_samples"):
            if k in batch:
                out[k] = batch[k]
        return out


def train_loader(cfg: "TrainTokenizerConfig", maker: TrainBatchMaker, *, rank: int | None = None,
                 world_size: int | None = None, pin_memory: bool | None = None):
    """``(ShardDataset, ShardLoader)`` of the training shards with ``maker`` in the workers
    (``data.num_workers``, ``data.prefetch_factor``; pinned memory when a GPU is present)."""
    from megarec.data.shards import ShardDataset, ShardLoader

    d = cfg.data
    ds = ShardDataset(d.shards, batch_size=cfg.train.batch_size, seed=cfg.train.seed, buffer_size=d.shuffle_buffer,
                      num_workers=d.num_workers, on_bad_sample=d.on_bad_sample, rank=rank, world_size=world_size,
                      load_images=maker.reader_loads_images, image_size=maker.reader_image_size,
                      unit_transform=maker)
    maker.batches_per_epoch = len(ds)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    kwargs: dict[str, Any] = {"pin_memory": pin}
    if d.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # the workers tokenise; no nested threads
        kwargs["prefetch_factor"] = d.prefetch_factor
    # Its own generator: a DataLoader iterator draws a base seed when created, which would otherwise come from
    # the global RNG and shift the dropout / noise stream of a resumed run (it creates its iterator mid-epoch).
    return ds, ShardLoader(ds, generator=torch.Generator().manual_seed(cfg.train.seed), **kwargs)
