"""TIGER (Rajput et al., 2023): semantic IDs from an RQ-VAE over item text, a T5 that
generates the next item's IDs, trie-constrained beam search at inference.

This module composes shared parts: :class:`~megarec.data.code_sequences.CodeSequenceData`
(codes -> tokens, several domains in one code space), the T5
:class:`~megarec.recommender.t5.GenerativeRecommender` trained with next-item token
cross-entropy (TIGER Sec. 3.2; the ``loss`` of HF T5 with the target item's L tokens
as labels), :func:`~megarec.recommender.beam_search.beam_search` and
:class:`~megarec.recommender.metrics.RankingMetrics` for evaluation.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from megarec.config import ConfigError
from megarec.data.code_sequences import CodeSamples, CodeSequenceData, select_codes
from megarec.data.code_vocab import CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import Domain
from megarec.engine.checkpoint import load_state_dict_into
from megarec.engine.trainer import TrainTask
from megarec.methods.base import Method
from megarec.methods.evaluation import evaluate_beam
from megarec.recommender.beam_recommender import BeamRecommender
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
from megarec.recommender.trie import ItemTrie
from megarec.tokenizer.commands import stage_codes

if TYPE_CHECKING:  # the entry point's config; only its sections are read here
    from megarec.data.domain import MultiDomain
    from megarec.methods.training import TrainRecConfig

CODES_FILE = "codes.safetensors"


def prepare(cfg: "TrainRecConfig", domains: Sequence[Domain]) -> CodeSequenceData:
    """Tokenised samples; a codes file that does not cover the data is a DataError here, before any compute."""
    if not cfg.data.codes:
        raise ConfigError("method tiger needs data.codes: the codes file written by `megarec train-tokenizer`")
    return CodeSequenceData(domains, CodesFile.load(cfg.data.codes), max_len=cfg.data.max_len,
                            codes_source=cfg.data.codes)


def build_model(cfg: "TrainRecConfig", data: CodeSequenceData) -> GenerativeRecommender:
    return GenerativeRecommender(cfg.tiger, data.vocab)


def domain_tries(data: CodeSequenceData, device: torch.device | str) -> list[ItemTrie]:
    """One trie per domain over that domain's items (its ranking candidates)."""
    return [ItemTrie(data.item_tokens[data.domain_items(d)], vocab=data.vocab).to(device)
            for d in range(len(data.multi.domains))]


def evaluate(model: GenerativeRecommender, data: CodeSequenceData, per_domain: Sequence[CodeSamples],
             tries: Sequence[ItemTrie], beam_size: int, batch_size: int, device: torch.device | str,
             ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall/NDCG@K by trie-constrained beam search over each domain's items (PROTOCOL.md), pooled over
    every user of every domain and rank; with several domains also ``"<domain>/recall@k"`` etc. A
    collective: every rank runs the same number of beam searches (padded batches), as ZeRO-3 requires."""
    return evaluate_beam(model, tries, data.multi.offsets, per_domain, data.domain_names, beam_size, batch_size,
                         device, ks)


def make_task(cfg: "TrainRecConfig", data: CodeSequenceData, device: torch.device,
              metadata: dict[str, str]) -> TrainTask:
    tries = domain_tries(data, device)

    def loss(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return {"loss": out.loss}

    def run_eval(module: GenerativeRecommender, split: str) -> dict[str, float]:
        per_domain = data.valid if split == "valid" else data.test
        return evaluate(module, data, per_domain, tries, cfg.train.beam_size, cfg.train.eval_batch_size, device)

    return TrainTask(num_samples=len(data.train), batch=lambda idx: data.train.batch(idx, device), loss=loss,
                     evaluate=run_eval, export_metadata=metadata, lengths=data.train.lengths)


# --------------------------------------------------------------------------- inference
def load_recommender(cfg: "TrainRecConfig", model_state: dict[str, torch.Tensor], codes: CodesFile,
                     item_keys: list[str], candidates: np.ndarray) -> BeamRecommender:
    vocab = CodeVocab(codes.codebook_sizes)
    model = GenerativeRecommender(cfg.tiger, vocab)
    load_state_dict_into(model, model_state, source="the trained model")
    tokens = vocab.item_tokens(select_codes(codes, item_keys))
    return BeamRecommender(model, candidates, tokens, cfg.data.max_len, cfg.train.beam_size)



def tiger_codes(domains: Sequence[Domain], out_dir: Path, settings: Sequence[tuple[str, Any]], seed: int,
                progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """TIGER's item tokenization: one RQ-VAE on the item text of every domain, one codes
    file with collisions resolved over the merged catalogue (``megarec train-tokenizer A B``).

    ``settings`` are TokenizerConfig keys (the profile's ``stages.tokenizer``, then the
    caller's); the tokenizer seed defaults to the run's. The codes file in
    ``out_dir/tokenizer`` is reused only when it was made with the same settings.
    """
    for d in domains:
        d.require_text("tiger")
    return stage_codes(domains, out_dir / "tokenizer", settings, base=[("seed", str(seed))], progress=progress)


class TigerMethod(Method):
    """``method: tiger`` (plug-in of :mod:`megarec.methods.training`)."""

    name = "tiger"
    config_section = "tiger"
    config_cls = T5RecConfig
    generative = True
    model_files = (CODES_FILE,)

    def prepare_inputs(self, cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path,
                       stages: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        if cfg.data.codes:       # given by the user: nothing to run
            return {}
        path, stats = tiger_codes(domains, out_dir, stages.get("tokenizer", []), cfg.train.seed, progress)
        cfg.data.codes = str(path.resolve())
        return {"tokenizer": stats}

    # the module's functions are the plug-in's steps
    prepare = staticmethod(prepare)
    build_model = staticmethod(build_model)
    make_task = staticmethod(make_task)

    def write_model_files(self, cfg: "TrainRecConfig", model_dir: Path) -> None:
        shutil.copyfile(cfg.data.codes, model_dir / CODES_FILE)

    def load_recommender(self, cfg: "TrainRecConfig", model_dir: Path, state: dict[str, torch.Tensor],
                         multi: "MultiDomain", candidates: np.ndarray) -> BeamRecommender:
        return load_recommender(cfg, state, CodesFile.load(model_dir / CODES_FILE), multi.item_keys(), candidates)
