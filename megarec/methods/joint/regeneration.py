"""Code regeneration shared by the joint methods (ETEGRec, UniGRec): after a tokenizer update every
item's codes are recomputed from the current tokenizer (a collective under ZeRO-3), written into the
model's code buffer (the targets and tries of the next epochs) with the epoch they start, and their
statistics (change rate, collision rate, per-level usage and perplexity) logged as ``codebook/*`` to
``run_dir/tb/codebook``. Each method's epoch schedule subclasses :class:`CodeRegeneration` and says
how its tokenizer makes codes (:meth:`CodeRegeneration.new_codes`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megarec.distributed import get_logger, get_world_size, is_main_process
from megarec.methods.joint.samples import code_stats

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig


class CodeRegeneration:
    """``data.model`` holds ``item_codes`` (every item's codes) and ``codes_epoch`` (the epoch they start)."""

    def __init__(self, cfg: "TrainRecConfig", data: Any, num_samples: int, logger: str) -> None:
        self.cfg, self.data = cfg, data
        self.steps_per_epoch = math.ceil(math.ceil(num_samples / get_world_size()) / cfg.train.batch_size)
        self.log = get_logger(logger)
        self._tb = None

    @property
    def model(self) -> Any:
        assert self.data.model is not None, "build_model first"
        return self.data.model

    def new_codes(self, previous: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Every item's codes ``[N, L]`` from the current tokenizer, and the assignment's statistics;
        ``previous`` are the codes they replace (stable dedup tokens: an item whose prefix is unchanged
        keeps its own)."""
        raise NotImplementedError

    def regenerate(self, first_epoch: int) -> dict[str, float]:
        """New codes for every item, used from epoch ``first_epoch`` on (collective); logs ``codebook/*``."""
        model = self.model
        old = model.item_codes.clone()
        new, stats = self.new_codes(old)
        model.item_codes.copy_(new.to(model.item_codes.device))
        model.codes_epoch.fill_(first_epoch)
        scalars = code_stats(old.cpu(), new.cpu(), self.data.vocab.codebook_sizes, stats)
        self.log.info("codes regenerated for epoch %d: change rate %.4f, collision rate %.4f", first_epoch,
                      scalars["change_rate"], scalars["collision_rate"])
        self.log_codebook(scalars, first_epoch * self.steps_per_epoch)
        return scalars

    def log_codebook(self, values: dict[str, float], step: int) -> None:
        """``codebook/<name>`` scalars at ``step`` (main process; its own TensorBoard folder)."""
        if not is_main_process():
            return
        if self._tb is None:
            from megarec.engine.tb import TBLogger

            self._tb = TBLogger(Path(self.cfg.train.run_dir) / "tb" / "codebook")
        self._tb.scalars(values, step, prefix="codebook/")
        self._tb.flush()
