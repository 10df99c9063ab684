"""UTGRec's tokenizer training as a task of :class:`~megarec.engine.loop.TrainLoop`.

One step: shard batch -> anchors + co-occurring positives (:class:`~.batches.Batcher`), ``L_T``
(Eq. 13); k-means initialisation of the codebooks at the first quantising step, dead-code restarts
after each optimizer step. The logging window adds per-level code usage / perplexity (code counts
accumulated on the device), restarts, tokens/s; every ``eval_every`` steps the held-out collision
rate. Task state in checkpoints: the dead-code counters, ``kmeans_done``, ``restarts``, the last
window's summary.

Host syncs in a step: none of this task's (code counts by ``index_add_``, tokens summed on the device,
read at the window); see :mod:`megarec.engine.loop` for the list of those that remain.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megarec.engine.loop import LoopTask
from megarec.engine.sources import StreamBatches
from megarec.engine.tb import TBLogger
from megarec.methods.utgrec.batches import Batcher, codebook_stats, encode_catalogue
from megarec.methods.utgrec.tokenizer import quantizing, tokenizer_loss
from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig


class TokenizerTask(LoopTask):
    """``total`` optimizer steps of tokenizer training from ``loader`` (a resumable ShardLoader)."""

    def __init__(self, cfg: TrainTokenizerConfig, module, batcher: Batcher, loader, num_items: int, total: int,
                 accumulation: int, rank: int, device: torch.device) -> None:
        from megarec.distributed import get_logger

        self.cfg, self.module, self.batcher, self.loader = cfg, module, batcher, loader
        self.total, self.rank, self.device = total, rank, device
        self.source = StreamBatches(loader, total, accumulation, desc="utgrec tokenizer")
        self.log = get_logger("megarec.train_tokenizer")
        self.warmup = 0 if cfg.train.init_from else cfg.utgrec.loss.warmup_steps
        self.heldout = np.random.default_rng(cfg.train.seed).permutation(num_items)[:cfg.data.heldout_items]
        self.kmeans_done, self.restarts, self.last = bool(cfg.train.init_from), 0, {}
        self.quant = False
        self.reset_window()

    # ------------------------------------------------------------------ steps
    def prepare(self, batch: dict, step: int):
        """Model inputs of a shard batch (host work: positives, prompts, images; timed as data wait)."""
        return self.batcher.train_batch(batch, step, self.rank)

    def loss(self, engine, inputs, step: int) -> dict[str, torch.Tensor]:
        enc, ids, mask, lat, has = inputs
        self.quant = quantizing(step, self.warmup)
        if self.quant and self.cfg.utgrec.codebook.kmeans_init and not self.kmeans_done:
            with torch.no_grad():   # anchors and positives of this step, pooled over ranks
                self.module.tree.init_from_data(self.module.code_inputs(**enc))
            self.kmeans_done = True
        out = engine(enc, ids, mask, lat, has, quantize=self.quant)
        codes = out.tree.codes   # per-level counts without bincount (a host sync on CUDA: it reads the max)
        for l, c in enumerate(self.counts):
            c.index_add_(0, codes[:, l], torch.ones_like(codes[:, l]))
        self.tokens += enc["attention_mask"].sum()
        return tokenizer_loss(out, self.cfg.utgrec.loss, self.quant)

    def measurable(self, step: int) -> bool:
        """Not the step of the k-means initialisation (one-off work, kept out of the FLOP count)."""
        return not (quantizing(step, self.warmup) and self.cfg.utgrec.codebook.kmeans_init and not self.kmeans_done)

    def samples(self, batch: dict) -> int:
        return len(batch["key"])   # anchors (each also encodes a positive)

    def after_step(self, step: int, out: dict[str, torch.Tensor]) -> None:
        if self.quant:
            self.restarts += self.module.tree.restart_dead_codes()

    # ------------------------------------------------------------------ logging window
    def window_scalars(self, means: dict[str, float], seconds: float) -> dict[str, float]:
        from megarec.distributed import all_reduce_sum

        for c in self.counts:
            all_reduce_sum(c)
        all_reduce_sum(self.tokens)
        stats = codebook_stats([c.cpu() for c in self.counts])
        self.last = {**means, **stats}
        return {**{f"codebook/{k}": v for k, v in stats.items()}, "codebook/restarts": self.restarts,
                "perf/tokens_per_s": float(self.tokens) / max(seconds, 1e-9), "train/quantizing": float(self.quant),
                "data/bad_samples": self.loader.bad_samples + self.batcher.bad_images}

    def reset_window(self) -> None:
        self.counts = [torch.zeros(k, dtype=torch.long, device=self.device) for k in self.module.codebook_sizes]
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)

    def window_state(self) -> dict[str, Any]:
        return {"tokens": int(self.tokens), "counts": [c.cpu().tolist() for c in self.counts]}

    def load_window_state(self, state: dict[str, Any]) -> None:
        self.tokens.fill_(state["tokens"])
        self.counts = [torch.tensor(c, dtype=torch.long, device=self.device) for c in state["counts"]]

    # ------------------------------------------------------------------ evaluation, state
    def heldout_collisions(self) -> float:
        """Collision rate of the last-level codes of the held-out items (collective)."""
        from megarec.tokenizer.assign import collision_rate

        if len(self.heldout) == 0:
            return 0.0
        h = encode_catalogue(self.module, self.batcher, self.heldout, self.cfg.export.batch_size)
        return collision_rate(self.module.tree.snapshot().last_level(h)[0].numpy())

    def evaluate_step(self, step: int, tb: TBLogger) -> None:
        rate = self.heldout_collisions()
        tb.scalars({"collision_rate": rate}, step, prefix="codebook/")
        self.last["collision_rate"] = rate
        self.log.info("step %d/%d %s held-out collision rate %.4f", step, self.total, _summary(self.last), rate)

    def state_dict(self) -> dict[str, Any]:
        tree = self.module.tree   # the dead-code counters are buffers outside the DeepSpeed state
        return {"kmeans_done": self.kmeans_done, "restarts": self.restarts, "last": self.last,
                "tree_unused": {"root": tree.root_unused.cpu().tolist(), "leaf": tree.leaf_unused.cpu().tolist()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kmeans_done, self.restarts, self.last = bool(state["kmeans_done"]), int(state["restarts"]), state["last"]
        for name, v in state["tree_unused"].items():
            getattr(self.module.tree, f"{name}_unused").copy_(torch.tensor(v))


def _summary(last: dict[str, float]) -> str:
    """The last logging window's losses and per-level perplexities, for the console / SLURM log."""
    keys = ["loss", *sorted(k for k in last if k not in ("loss", "collision_rate") and not k.startswith("usage_"))]
    return " ".join(f"{k} {last[k]:.4g}" for k in keys if k in last)
