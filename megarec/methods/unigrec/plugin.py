"""UniGRec (unified generative recommendation with soft identifiers) as a plug-in of
``train_rec.py``: ``method: unigrec``.

Two stages (Sec. 3.5, Algorithm 1):

1. **Tokenizer pre-training** (the pipeline's ``tokenizer`` stage, ``megarec
   train-tokenizer --rqvae.quantizer soft``): a soft RQ-VAE on item text embeddings,
   ``L_Pre = L_Recon + lambda_CU L_CU`` with tau annealed linearly from tau_max to
   tau_min (Eqs. 14, 16, 17, 21): :mod:`megarec.tokenizer.soft`, :mod:`megarec.tokenizer.train`.
2. **Joint training** (this module, :mod:`megarec.methods.unigrec.model`): tau fixed at
   tau_min, soft identifiers into the T5 encoder (Eq. 15), one optimiser with two
   parameter groups (recommender at ``train.lr``, tokenizer at ``unigrec.tokenizer_lr``),
   ``L_Joint = L_Rec + lambda_Recon L_Recon + lambda_T L_CD^T + lambda_R L_CD^R`` (Eq. 22).
   The targets are the items' hard codes, regenerated from the tokenizer at every epoch
   end (a buffer of the model, so a resumed run and ``megarec recommend`` read the same
   codes); inference feeds hard codes and decodes with the trie over each domain's items.

The SASRec teacher (its item embeddings) and the pre-trained tokenizer are files
(``unigrec.teacher``, ``unigrec.tokenizer``) or, when not given, produced by the pipeline
(:meth:`UniGRecMethod.prepare_inputs`). Differences from the public code
(Jialei-03/UniGRec) are listed in ``docs/README_unigrec.md``.

The sample/code helpers shared with ETEGRec (histories as item indices, the code table,
code regeneration and its statistics, the teacher stage) come from
:mod:`megarec.methods.joint.samples`, evaluation on the current codes from
:mod:`megarec.methods.etegrec.plugin`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from megarec.config import ConfigError, TokenizerConfig, field
from megarec.data.code_vocab import CodeVocab
from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.embeddings import load_item_embeddings
from megarec.data.splits import leave_one_out
from megarec.engine.trainer import TrainTask
from megarec.methods.joint import samples as shared
from megarec.methods.joint.config import JointCodesConfig
from megarec.methods.joint.inference import trained_codes, trained_recommender
from megarec.methods.joint.method import JointData, JointMethod, joint_task
from megarec.methods.joint.regeneration import CodeRegeneration
from megarec.methods.unigrec.losses import joint_loss
from megarec.methods.unigrec.model import UniGRecModel, UniGRecTerms
from megarec.recommender.t5 import GenerativeRecommender
from megarec.tokenizer.commands import stage_codes
from megarec.tokenizer.rqvae import RQVAE

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig


@dataclass
class UniGRecConfig(JointCodesConfig):
    """``unigrec:`` section. Defaults: the paper (Sec. 4.1.4); see docs/README_unigrec.md."""
    section = "unigrec"

    teacher: str = field("", help="SASRec item-embedding file (`megarec export-embeddings`), the distillation "
                                  "teacher; empty = the pipeline trains SASRec")
    identifiers: str = field("soft", choices=("soft", "hard"),
                             help="soft: probability-weighted code embeddings into the encoder (Eq. 15); hard: the "
                                  "items' hard codes (the 'hard identifiers' ablation)")
    tau: float = field(0.0, min=0.0, help="stage-2 temperature of Eq. 14 (0 = the tokenizer's rqvae.tau_min, as "
                                          "the paper fixes it)")
    tokenizer_lr: float = field(2e-7, min=0.0, help="tokenizer peak learning rate (paper: {2e-7, 2e-8}; 0 = frozen "
                                                   "tokenizer); the T5's is train.lr (paper: {2e-3, 5e-3, 8e-3})")
    recon_weight: float = field(0.5, min=0.0, help="lambda_Recon of Eq. 22 (paper: 0.5)")
    cd_t_weight: float = field(0.1, min=0.0, help="lambda_T: weight of L_CD^T (Eq. 22; paper searches "
                                                  "{0.01, 0.05, 0.1, 0.5, 1}; 0 = the 'w/o L_CD^T' ablation)")
    cd_r_weight: float = field(0.1, min=0.0, help="lambda_R: weight of L_CD^R (Eq. 22; paper searches "
                                                  "{0.01, 0.05, 0.1, 0.5, 1}; 0 = the 'w/o L_CD^R' ablation)")
    cd_tau: float = field(0.07, min=1e-8, help="tau' of the InfoNCE of L_CD^R (Eq. 19; paper: 0.07)")
    cd_t_teacher_map: str = field("fixed", choices=("fixed", "trainable"),
                                  help="teacher side of L_CD^T: fixed = the least-squares map of the teacher's item "
                                       "embeddings to the tokenizer's inputs (only the student side learns, so the "
                                       "minimum carries the teacher's information); trainable = the paper's linear "
                                       "layer (both sides can go constant: KL 0, nothing learnt)")
    cd_t_tau: float = field(1.0, min=0.0, help="temperature of the code distributions of L_CD^T (Eq. 18). 1 = the "
                                               "public code's scale (no temperature); 0 = the stage-2 tau as the "
                                               "paper reads, which at tau_min 1e-3 makes L_CD^T ~3,000x larger "
                                               "(~760 at the start against an L_Rec of a few nats)")


# --------------------------------------------------------------------------- samples
class UniGRecSamples(shared.HistorySamples):
    """ETEGRec's history samples plus the history's item indices (the soft path embeds them)."""

    def batch(self, indices: np.ndarray | Sequence[int], device: torch.device | str) -> dict[str, torch.Tensor]:
        out = super().batch(indices, device)
        idx = np.asarray(indices, dtype=np.int64)
        width = int(self.counts[idx].max())
        out["items"] = self.items.index_select(0, torch.from_numpy(idx))[:, :width].to(device, non_blocking=True)
        out["counts"] = torch.from_numpy(self.counts[idx]).to(device, non_blocking=True)
        return out


def _samples(parts: Sequence[shared.HistorySamples]) -> UniGRecSamples:
    s = shared.concat_history_samples(parts) if len(parts) > 1 else parts[0]
    return UniGRecSamples(s.items, s.counts, s.targets, s.table)


# --------------------------------------------------------------------------- data / model
@dataclass(kw_only=True)
class UniGRecData(JointData):
    teacher_emb: torch.Tensor | None      # the SASRec teacher's item embeddings (None: no distillation)
    tau: float                            # the stage-2 temperature of Eq. 14


def uses_teacher(s: UniGRecConfig) -> bool:
    return s.cd_t_weight > 0 or s.cd_r_weight > 0


def tokenizer_inputs(folder: str | Path, domains: Sequence[Domain]) -> tuple[RQVAE, TokenizerConfig, torch.Tensor]:
    """The stage-1 tokenizer and its input for every item (text embeddings cached in its folder)."""
    from megarec.tokenizer.commands import catalogue_inputs

    tokenizer, tok_cfg, extra = RQVAE.load(folder)
    if not tokenizer.soft:
        raise DataError(f"{folder}: a hard RQ-VAE; UniGRec needs a soft one (rqvae.quantizer: soft)")
    embeddings = extra.get("embeddings") if extra.get("input") == "embeddings" else None
    x = catalogue_inputs(list(domains), tok_cfg, Path(folder), embeddings, "unigrec")
    if x.shape[1] != tokenizer.in_dim:
        raise DataError(f"item inputs have dimension {x.shape[1]} but the tokenizer in {folder} expects "
                        f"{tokenizer.in_dim}")
    return tokenizer, tok_cfg, x.float()


def prepare(cfg: "TrainRecConfig", domains: Sequence[Domain]) -> UniGRecData:
    """Tokenizer, its inputs, the teacher, initial codes, samples; every input error raised here."""
    s: UniGRecConfig = cfg.unigrec
    if not s.tokenizer or (uses_teacher(s) and not s.teacher):
        raise ConfigError("method unigrec needs unigrec.tokenizer (a soft RQ-VAE: `megarec train-tokenizer "
                          "--rqvae.quantizer soft`) and, with distillation on, unigrec.teacher (SASRec item "
                          "embeddings: `megarec export-embeddings`); the pipeline (`megarec quickstart --methods "
                          "unigrec`, tools/reproduce.py) produces both when they are not given")
    multi = MultiDomain(list(domains))
    keys = multi.item_keys()
    tokenizer, tok_cfg, x = tokenizer_inputs(s.tokenizer, domains)
    teacher = load_item_embeddings(s.teacher, keys)[0].float() if uses_teacher(s) else None
    tau = s.tau if s.tau > 0 else tok_cfg.rqvae.tau_min
    tokenizer.tau.fill_(tau)
    codes, stats = shared.item_codes(tokenizer, x, keys, s)
    sizes = list(tokenizer.codebook_sizes) + ([s.collision_codes] if s.collisions == "dedup" else [])
    vocab = CodeVocab(sizes)
    table = shared.CodeTable(vocab, codes)
    splits = [leave_one_out(d, max_len=cfg.data.max_len) for d in multi.domains]
    n = cfg.data.max_len

    def part(kind: str) -> list[UniGRecSamples]:
        return [_samples([shared.history_samples(getattr(sp, kind), o, n, table)])
                for sp, o in zip(splits, multi.offsets)]

    train = _samples([shared.history_samples(sp.train, o, n, table) for sp, o in zip(splits, multi.offsets)])
    return UniGRecData(multi=multi, item_keys=keys, item_emb=x, teacher_emb=teacher, tokenizer=tokenizer, tau=tau,
                       vocab=vocab, table=table, train=train, valid=part("valid"), test=part("test"), code_stats=stats)


def build_model(cfg: "TrainRecConfig", data: UniGRecData) -> UniGRecModel:
    s: UniGRecConfig = cfg.unigrec
    data.tokenizer.quantizer.dead_code_steps = 0    # no restarts inside joint training (codes would jump)
    model = UniGRecModel(GenerativeRecommender(s.t5, data.vocab), data.tokenizer, data.item_emb, data.teacher_emb,
                         data.table.codes, data.tau, s.identifiers, cd_t=s.cd_t_weight > 0, cd_r=s.cd_r_weight > 0,
                         cd_tau=s.cd_tau, tokenizer_frozen=s.tokenizer_lr == 0, cd_t_tau=s.cd_t_tau,
                         teacher_map=s.cd_t_teacher_map)
    data.model = model
    data.table.model = model
    return model


# --------------------------------------------------------------------------- schedule
def combine(terms: UniGRecTerms, s: UniGRecConfig) -> dict[str, torch.Tensor]:
    """The loss dict of a step: ``L_Joint`` (Eq. 22) under ``"loss"`` and every raw term."""
    total = joint_loss(terms.rec, terms.recon, terms.cd_t, terms.cd_r, s.recon_weight, s.cd_t_weight, s.cd_r_weight)
    return {"loss": total, "rec": terms.rec, "recon": terms.recon, "cd_t": terms.cd_t, "cd_r": terms.cd_r,
            "uniformity": terms.uniformity}


class Schedule(CodeRegeneration):
    """Epoch hooks: hard codes regenerated from the tokenizer at the start of every epoch after the first
    (targets, tries),
    ``codebook/*`` scalars (per-level usage and perplexity, collision rate, change rate)."""

    def __init__(self, cfg: "TrainRecConfig", data: UniGRecData, num_samples: int) -> None:
        super().__init__(cfg, data, num_samples, "megarec.unigrec")
        self.s: UniGRecConfig = cfg.unigrec

    @property
    def model(self) -> UniGRecModel:
        return super().model

    @property
    def regenerates(self) -> bool:
        return not self.model.tokenizer_frozen

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 0:
            codes = self.model.item_codes.cpu()
            self.log_codebook(shared.code_stats(codes, codes, self.data.vocab.codebook_sizes, self.data.code_stats), 0)
        # The codes of epoch e are regenerated from the tokenizer at its start (not at the end of epoch e - 1):
        # the validation and the export after an epoch see the codes it trained on. A resumed epoch finds
        # them in its checkpoint (codes_epoch) and does not regenerate again.
        elif self.regenerates and int(self.model.codes_epoch) < epoch:
            self.regenerate(epoch)

    def new_codes(self, previous: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return shared.item_codes(self.model.tokenizer, self.model.item_emb, self.data.item_keys, self.s, previous)

    def loss(self, engine, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = engine(b["items"], b["counts"], b["input_ids"], b["attention_mask"], b["labels"], b["targets"])
        return combine(terms, self.s)


def make_task(cfg: "TrainRecConfig", data: UniGRecData, device: torch.device, metadata: dict[str, str]) -> TrainTask:
    return joint_task(cfg, data, Schedule(cfg, data, len(data.train)), device, metadata)


# --------------------------------------------------------------------------- inference
def load_recommender(cfg: "TrainRecConfig", model_dir: Path, state: dict[str, torch.Tensor], multi: MultiDomain,
                     candidates: np.ndarray):
    """The trained T5 and the hard codes it was selected with (both in ``model.safetensors``)."""
    s: UniGRecConfig = cfg.unigrec
    codes = trained_codes(state, multi, s.collisions, s.collision_codes, "unigrec")
    return trained_recommender(s.t5, state, codes, candidates, cfg.data.max_len, cfg.train.beam_size)


# --------------------------------------------------------------------------- pipeline stages
def pretrain_tokenizer(cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path,
                       settings: Sequence[tuple[str, Any]], progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Stage 1 (Eq. 21): a soft RQ-VAE on the item text of every domain (``megarec train-tokenizer``
    keys in ``settings``; ``rqvae.quantizer`` is forced to soft; its codes file uses the dedup policy
    unless told otherwise -- stage 2 makes its own codes). Reused when ``out_dir`` holds one trained
    with the same settings."""
    for d in domains:
        d.require_text("unigrec")
    _, stats = stage_codes(domains, out_dir, settings, base=[("seed", str(cfg.train.seed)), ("collisions", "dedup")],
                           forced=[("rqvae.quantizer", "soft")], progress=progress)
    return out_dir, stats


class UniGRecMethod(JointMethod):
    """``method: unigrec`` (plug-in of :mod:`megarec.methods.training`)."""

    name = "unigrec"
    config_section = "unigrec"
    config_cls = UniGRecConfig
    frozen_tokenizer_allowed = True    # tokenizer_lr 0: the model keeps it frozen (no group)

    teacher_key = "teacher"

    def uses_teacher(self, section: UniGRecConfig) -> bool:
        return uses_teacher(section)

    # the module's functions are the plug-in's steps
    prepare = staticmethod(prepare)
    build_model = staticmethod(build_model)
    make_task = staticmethod(make_task)
    pretrain_tokenizer = staticmethod(pretrain_tokenizer)
    load_recommender = staticmethod(load_recommender)
