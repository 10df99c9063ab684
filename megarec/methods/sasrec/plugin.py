"""SASRec baseline (Kang & McAuley, 2018) as a method of ``train_rec.py``.

RecBole's SASRec under PROTOCOL.md: full-softmax cross-entropy over all items,
full ranking at evaluation (the top-K of every item's score, restricted to the
evaluated domain's items). Several domains share one item space (global
indices, :class:`~megarec.data.domain.MultiDomain`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import deepspeed
import numpy as np
import torch
from torch import nn

from megarec.config import ConfigError
from megarec.data.domain import Domain, MultiDomain
from megarec.data.splits import Samples, leave_one_out
from megarec.engine.checkpoint import load_state_dict_into
from megarec.engine.trainer import TrainTask
from megarec.methods.base import Method
from megarec.methods.evaluation import evaluate_domains
from megarec.recommender.sasrec import SASRec, SASRecConfig, pad_histories

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig


@dataclass
class ItemSamples:
    """Left-padded histories of global item index + 1 (0 = padding) and global targets."""

    history: torch.Tensor   # [n, max_len]
    targets: torch.Tensor   # [n]

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: np.ndarray, device: torch.device | str) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {"history": self.history.index_select(0, t).to(device, non_blocking=True),
                "targets": self.targets.index_select(0, t).to(device, non_blocking=True)}


def encode(samples: Samples, offset: int, max_len: int) -> ItemSamples:
    hist = [np.asarray(h, dtype=np.int64) + offset for h in samples.histories]
    return ItemSamples(pad_histories(hist, max_len), torch.from_numpy(np.asarray(samples.targets) + offset))


@dataclass
class SASRecData:
    multi: MultiDomain
    train: ItemSamples
    valid: list[ItemSamples]
    test: list[ItemSamples]

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.multi.domains]


def prepare(cfg: "TrainRecConfig", domains: Sequence[Domain]) -> SASRecData:
    if cfg.data.max_len > cfg.sasrec.max_len:
        raise ConfigError(f"data.max_len ({cfg.data.max_len}) exceeds sasrec.max_len ({cfg.sasrec.max_len}), "
                          "the number of learned positions")
    multi = MultiDomain(list(domains))
    splits = [leave_one_out(d, max_len=cfg.data.max_len) for d in multi.domains]
    n = cfg.data.max_len
    parts = [encode(s.train, o, n) for s, o in zip(splits, multi.offsets)]
    train = ItemSamples(torch.cat([p.history for p in parts]), torch.cat([p.targets for p in parts]))
    return SASRecData(multi, train, [encode(s.valid, o, n) for s, o in zip(splits, multi.offsets)],
                      [encode(s.test, o, n) for s, o in zip(splits, multi.offsets)])


class SASRecRanker(nn.Module):
    """The module DeepSpeed wraps: ``forward(history)`` -> full scores ``[B, N]``,
    ``forward(history, target)`` -> cross-entropy loss.

    Scores read the item-embedding table outside the embedding's own forward; under
    ZeRO-3 that parameter is registered as external so it is gathered for this
    module's forward (DeepSpeed's documented pattern for tied/external weights).
    """

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model
        deepspeed.zero.register_external_parameter(self, model.item_emb.weight)

    def forward(self, history: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            return self.model.scores(history)
        return self.model.loss(history, target)


def build_model(cfg: "TrainRecConfig", data: SASRecData) -> SASRecRanker:
    return SASRecRanker(SASRec(data.multi.num_items, cfg.sasrec))


@torch.no_grad()
def evaluate(ranker: nn.Module, data: SASRecData, per_domain: Sequence[ItemSamples], batch_size: int,
             device: torch.device | str, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Full ranking over each domain's items (PROTOCOL.md); pooled and, with several domains, per domain."""
    def rank_batch(d: int, b: dict[str, torch.Tensor]) -> torch.Tensor:
        start, stop = data.multi.offsets[d], data.multi.offsets[d] + data.multi.domains[d].num_items
        scores = ranker(b["history"])[:, start:stop]
        return scores.topk(min(max(ks), stop - start), dim=1).indices + start

    return evaluate_domains(per_domain, data.domain_names, rank_batch, batch_size, device, ks)


def make_task(cfg: "TrainRecConfig", data: SASRecData, device: torch.device, metadata: dict[str, str]) -> TrainTask:
    def loss(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": engine(batch["history"], batch["targets"])}

    def run_eval(module: nn.Module, split: str) -> dict[str, float]:
        per_domain = data.valid if split == "valid" else data.test
        return evaluate(module, data, per_domain, cfg.train.eval_batch_size, device)

    return TrainTask(num_samples=len(data.train), batch=lambda idx: data.train.batch(idx, device), loss=loss,
                     evaluate=run_eval, export_metadata=metadata)


class SASRecRecommender:
    """A trained SASRec for ``megarec recommend``: histories -> top-K global item indices."""

    def __init__(self, ranker: SASRecRanker, candidates: np.ndarray, max_len: int) -> None:
        self.ranker = ranker.eval()
        self.candidates = torch.from_numpy(np.asarray(candidates, dtype=np.int64))
        self.max_len = max_len

    @torch.no_grad()
    def recommend(self, histories: Sequence[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.ranker(pad_histories(histories, self.max_len))[:, self.candidates]
        top = scores.topk(min(k, len(self.candidates)), dim=1)
        return self.candidates[top.indices], top.values


def load_recommender(cfg: "TrainRecConfig", model_state: dict[str, torch.Tensor], num_items: int,
                     candidates: np.ndarray) -> SASRecRecommender:
    ranker = SASRecRanker(SASRec(num_items, cfg.sasrec))
    load_state_dict_into(ranker, model_state, source="the trained model")
    return SASRecRecommender(ranker, candidates, cfg.data.max_len)


class SASRecMethod(Method):
    """``method: sasrec`` (plug-in of :mod:`megarec.methods.training`); histories are padded to a
    fixed length (learned positions), so batches are not grouped by length."""

    name = "sasrec"
    config_section = "sasrec"
    config_cls = SASRecConfig

    # the module's functions are the plug-in's steps
    prepare = staticmethod(prepare)
    build_model = staticmethod(build_model)
    make_task = staticmethod(make_task)

    def load_recommender(self, cfg: "TrainRecConfig", model_dir: Path, state: dict[str, torch.Tensor],
                         multi: MultiDomain, candidates: np.ndarray) -> SASRecRecommender:
        return load_recommender(cfg, state, multi.num_items, candidates)
