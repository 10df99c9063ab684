"""UTGRec tokenizer batches and catalogue passes for ``megarec/train_tokenizer.py``.

:class:`Batcher` moves the model inputs that the DataLoader workers prepared (anchor + co-occurring
positive, encoder prompts, text targets, VAE latents: :mod:`.data_path`) to the device; :func:`encode_catalogue` encodes a set of items
on every rank (ZeRO-3: same number of encoder passes everywhere); :func:`export_codes` assigns
the catalogue's codes over the merged catalogue; :func:`codebook_stats` summarises code counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from megarec.methods.utgrec.latent_cache import LatentCache

if TYPE_CHECKING:
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig


class Batcher:
    """Shard batches -> model inputs on the device: anchor + co-occurring positive, encoder prompts, text targets,
    VAE latents. Batches prepared in the DataLoader workers (:class:`~.data_path.TrainBatchMaker`) are only
    moved to the device (and through the VAE when latents are not cached); raw shard batches are prepared here
    first, by the same maker."""

    def __init__(self, cfg: "TrainTokenizerConfig", module, latents, lookup, device: torch.device) -> None:
        from megarec.methods.utgrec.data_path import TrainBatchMaker

        self.cfg, self.module, self.latents, self.lookup, self.device = cfg, module, latents, lookup, device
        u = cfg.utgrec
        self.qwen = u.encoder.backend == "qwen2vl"
        self.cache = latents if isinstance(latents, LatentCache) else None
        self.maker = TrainBatchMaker.for_config(cfg, module.encoder.preparer(), lookup, latents, rank=0)
        self.load_images = self.qwen
        self.image_size = self.maker.preparer.side
        self.bad_images = 0

    def _image(self, i: int) -> torch.Tensor | None:
        if not self.load_images:
            return None
        try:
            return self.lookup.image(i, self.image_size)
        except Exception:
            if self.cfg.data.on_bad_sample == "fail":
                raise
            self.bad_images += 1
            return None

    def train_batch(self, batch: dict, step: int, rank: int):
        """``(encoder inputs, text ids, text mask, latents or None, has_image)`` on the device for B anchors
        followed by their B positives."""
        if not batch.get("prepared"):   # a raw shard batch: positives drawn by (seed, step, rank), as in a worker
            self.maker.rank = rank
            batch = self.maker(batch, 0, step)
        self.bad_images += batch["bad_images"]
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        has, lat = to(batch["has"]), batch["latents"]
        if lat is not None:
            lat = to(lat)
        elif batch["vae_images"] is not None:   # decoder.cache_latents false: the VAE runs here, every step
            lat = torch.zeros(len(has), self.latents.num_tokens, self.latents.token_dim, device=self.device)
            if bool(batch["has"].any()):
                lat[has] = self.latents(to(batch["vae_images"][batch["has"]]))
        return {k: to(v) for k, v in batch["enc"].items()}, to(batch["ids"]), to(batch["mask"]), lat, has

    def encode_inputs(self, positions: Sequence[int]) -> dict:
        texts = [self.lookup.text(i) for i in positions]
        images = [self._image(i) if self.qwen else None for i in positions]
        enc = self.module.encoder.prepare(texts, images)
        return {k: v.to(self.device) for k, v in enc.items()}


@torch.no_grad()
def encode_catalogue(module, batcher: Batcher, positions: np.ndarray, batch_size: int) -> torch.Tensor:
    """``H' [len(positions), L, d_c]`` on every rank: rank r encodes positions ``r, r + world, ...`` (every rank
    runs the same number of encoder passes, ZeRO-3: short shares are padded with repeats), the shares are
    padded to one length, gathered with a plain ``all_gather`` (no autograd) and put back in order."""
    import torch.distributed as dist

    from megarec.distributed import get_rank, get_world_size
    from megarec.engine.sampler import eval_batches

    rank, world = get_rank(), get_world_size()
    n = len(positions)
    was = module.training
    module.eval()
    idx, out = [], []
    for b in eval_batches(n, batch_size, rank, world):
        hc = module.code_inputs(**batcher.encode_inputs(positions[b.indices]))
        idx.append(b.indices[:b.num_real])
        out.append(hc[:b.num_real].float())
    module.train(was)
    dev = batcher.device
    L, d = module.tree.num_levels, module.tree.dim
    mine = torch.cat(out) if out else torch.zeros(0, L, d, device=dev)
    got = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    if not np.array_equal(got, np.arange(rank, n, world)):
        raise RuntimeError("encode_catalogue: eval_batches no longer deals positions round-robin")
    if world == 1:
        return mine.cpu()
    per = -(-n // world)   # the longest share (rank 0's)
    padded = mine.new_zeros(per, L, d)
    padded[: mine.shape[0]] = mine
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded.contiguous())
    full = torch.zeros(n, L, d)
    for r, buf in enumerate(bufs):
        full[r::world] = buf[: len(range(r, n, world))].cpu()
    return full


def codebook_stats(counts: list[torch.Tensor]) -> dict[str, float]:
    """Per level: usage (fraction of codes used) and perplexity ``exp(entropy)`` of the code counts."""
    out = {}
    for l, c in enumerate(counts):
        p = c.double() / c.sum().clamp_min(1)
        nz = p[p > 0]
        out[f"usage_l{l + 1}"] = float((c > 0).double().mean())
        out[f"perplexity_l{l + 1}"] = float(torch.exp(-(nz * nz.log()).sum()))
    return out


def export_codes(module, batcher: Batcher, lookup, domains: Sequence[str] | None, policy: str, batch_size: int,
                 out: Path):
    """Codes of every item of ``domains`` (default all), assigned over the merged catalogue so that IDs are unique
    across domains (UTGRec Sec. 2.4.1), written as a codes file on rank 0. Collective; returns the CodesFile on
    rank 0, ``None`` elsewhere."""
    from megarec.data.domain import DataError
    from megarec.distributed import barrier, is_main_process
    from megarec.tokenizer.assign import assign_catalogue

    known = sorted(set(lookup.domains))
    wanted = list(domains) if domains else known
    missing = [d for d in wanted if d not in known]
    if missing:
        raise DataError(f"export.domains: {missing} not in the shards (they hold {known})")
    positions = np.array([i for i, d in enumerate(lookup.domains) if d in set(wanted)], dtype=np.int64)
    h = encode_catalogue(module, batcher, positions, batch_size)
    snap = module.tree.snapshot()
    codes = None
    if is_main_process():
        codes = assign_catalogue(snap, h, [lookup.keys[i] for i in positions], policy)
        out.parent.mkdir(parents=True, exist_ok=True)
        codes.save(out)
    barrier()
    return codes
