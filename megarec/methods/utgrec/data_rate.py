"""How fast UTGRec's training data path prepares items, for benchmarks (``tools/bench_scale.py``).

``items_per_second(cfg, num_workers, seconds)`` runs the training loader of a tokenizer run config exactly
as training does (:mod:`.data_path`: shard reading, positives drawn and read in batches, JPEG decoding at
the encoder's and, without a cache, the VAE's size, the Qwen2-VL image processor, prompts and text targets,
cached latent rows) without building the model: only the tokenizer and image processor are loaded. An item
is an anchor or a positive (a batch of B anchors is 2B items). Cheap to import; nothing runs on import.

    python -m megarec.methods.utgrec.data_rate [--config CONFIG.yaml] [--workers 4] [--seconds 20] [--key value ...]
"""
from __future__ import annotations

import time
from typing import Any, Sequence


def items_per_second(cfg: Any, num_workers: int = 0, seconds: float = 10.0, max_batches: int = 0,
                     warmup_batches: int = 1) -> dict[str, float]:
    """Items (anchors + positives) per second that the loader of ``cfg`` (a ``TrainTokenizerConfig``) delivers
    with ``num_workers`` workers over about ``seconds`` (after ``warmup_batches``: worker start-up is not
    counted), or ``max_batches``. Returns ``items_per_s``, ``items_per_s_per_worker`` (per worker process, the
    main process counting as one with 0 workers), ``batches``, ``items``, ``seconds``, ``num_workers``,
    ``batch_size`` and, per item, ``encoder_tokens_per_item`` (real prompt tokens),
    ``encoder_padded_tokens_per_item``, ``vision_patches_per_item`` (before the 2 x 2 merge) and
    ``text_targets_per_item``. Latents: read from ``decoder.latents_file`` or the catalogue's default cache
    when one exists (it is not made here); with neither the VAE images are prepared for the main process."""
    import dataclasses

    from megarec.methods.utgrec.data_path import TrainBatchMaker, train_loader
    from megarec.methods.utgrec.item_inputs import ItemPreparer
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.latent_cache import LatentCache, default_cache_path

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=int(num_workers)))
    u = cfg.utgrec
    e, d = u.encoder, u.decoder
    lookup = ItemLookup(cfg.data.shards, cfg.data.text_fields)
    preparer = ItemPreparer.from_pretrained(e.backend, e.path, u.codebook.levels, e.max_text_tokens, e.image_size)
    latents: Any = None
    if d.latents_file:
        latents = LatentCache(d.latents_file, d.vae_path, d.vae_image_size, d.latent_patch)
    elif d.vae_path:
        path = default_cache_path(cfg.data.shards, d.vae_path, d.vae_image_size, d.latent_patch)
        latents = LatentCache(path, d.vae_path, d.vae_image_size, d.latent_patch) if path.is_file() else _NoCache()
    maker = TrainBatchMaker.for_config(cfg, preparer, lookup, latents, rank=0)
    _, loader = train_loader(cfg, maker, rank=0, world_size=1, pin_memory=False)
    batches = items = 0
    tokens = {"encoder_tokens": 0.0, "encoder_padded_tokens": 0.0, "vision_patches": 0.0, "text_targets": 0.0}
    start = None
    it = iter(_forever(loader))
    for _ in range(warmup_batches):
        next(it)
    start = time.perf_counter()
    while True:
        b = next(it)
        batches += 1
        items += len(b["key"]) * 2
        _count_tokens(b, tokens)
        el = time.perf_counter() - start
        if (max_batches and batches >= max_batches) or (not max_batches and el >= seconds):
            break
    del it
    rate = items / max(el, 1e-9)
    return {"items_per_s": rate, "items_per_s_per_worker": rate / max(1, num_workers), "batches": batches,
            "items": items, "seconds": el, "num_workers": int(num_workers), "batch_size": cfg.train.batch_size,
            **{f"{k}_per_item": v / max(items, 1) for k, v in tokens.items()}}


def _count_tokens(b: dict, acc: dict[str, float]) -> None:
    """Adds a prepared batch's encoder tokens (real and padded), vision patches (before the merge) and text
    targets to ``acc``: what the step will compute on, for FLOPs per item."""
    enc = b["enc"]
    acc["encoder_tokens"] += float(enc["attention_mask"].sum())
    acc["encoder_padded_tokens"] += float(enc["attention_mask"].numel())
    if enc.get("image_grid_thw") is not None:
        acc["vision_patches"] += float(enc["image_grid_thw"].prod(-1).sum())
    acc["text_targets"] += float(b["mask"].sum())


class _NoCache:
    """Stands for the VAE (not loaded): the maker then prepares VAE-size images, as training without a cache."""


def _forever(loader):
    while True:
        yield from loader


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    from megarec.config import load_config, parse_overrides
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    p = argparse.ArgumentParser(prog="python -m megarec.methods.utgrec.data_rate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="tokenizer run config YAML")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    a, rest = p.parse_known_args(argv)
    cfg = load_config(TrainTokenizerConfig, a.config, parse_overrides(rest))
    print(json.dumps(items_per_second(cfg, a.workers, a.seconds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
