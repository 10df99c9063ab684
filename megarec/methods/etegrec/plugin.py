"""ETEGRec (Liu et al., SIGIR 2025) as a plug-in of ``train_rec.py``: ``method: etegrec``.

An RQ-VAE tokenizer over collaborative item embeddings (SASRec's, ``megarec
export-embeddings``) and a T5 recommender over its codes, trained together:

- recommender loss L_REC (Eq. 13) on the items' current codes;
- tokenizer loss L_SQ (Eqs. 8-10) on the batch's target items;
- sequence-item alignment L_SIA (Eqs. 14-15) and preference-semantic alignment
  L_PSA (Eq. 16): :mod:`megarec.methods.etegrec.model`;
- alternating optimisation (Sec. 3.4, Eqs. 17-18): cycles of ``cycle`` epochs; the
  first epoch of a cycle trains the tokenizer (L_IT = L_SQ + mu L_SIA + lambda L_PSA,
  recommender frozen), the others the recommender (L_GR = L_REC + mu L_SIA +
  lambda L_PSA, tokenizer frozen and codes fixed). After every epoch that trained the
  tokenizer, every item's codes are regenerated (collision-free under the chosen
  policy); tries are rebuilt from the current codes at each evaluation.

Freezing a side for an epoch = its LR gate at 0 (AdamW would otherwise move it
through momentum and weight decay), eval mode, its forward under ``torch.no_grad``
and ``requires_grad`` off (under ZeRO-3 a parameter without a gradient would
otherwise re-use its previous step's gradient); both sides are unfrozen at the epoch
end, before validation exports the model. Every rank runs both sides every step,
as ZeRO-3 requires. All schedule state derives from the epoch number and the
weights (the codes are a buffer of the model): a resumed run continues exactly.

Decoding is trie-constrained beam search over each domain's items (the public
code decodes without constraints). Options the paper leaves open follow the public
code and are configuration: alignment losses start after ``align_warmup_epochs``
(10 there), ``finetune_epochs`` final epochs train the recommender alone (the
public code does, the paper does not say; off by default). See
``docs/README_etegrec.md`` for the paper's defaults and the ablations.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from megarec.config import ConfigError, field
from megarec.data.code_vocab import CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.embeddings import load_item_embeddings
from megarec.data.splits import leave_one_out
from megarec.engine.trainer import TrainTask
from megarec.methods.etegrec.model import ETEGRecModel, ETEGRecTerms
from megarec.methods.joint.config import JointCodesConfig
from megarec.methods.joint.inference import trained_codes as shared_trained_codes
from megarec.methods.joint.inference import trained_recommender
from megarec.methods.joint.method import TOKENIZER_PREFIX, JointData, JointMethod, joint_task
from megarec.methods.joint.regeneration import CodeRegeneration
from megarec.methods.joint.samples import (CodeTable, concat_history_samples, history_samples,
                                          item_codes, vocab_sizes)
from megarec.recommender.t5 import GenerativeRecommender
from megarec.tokenizer.commands import stage_codes
from megarec.tokenizer.rqvae import RQVAE

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig


@dataclass
class ETEGRecConfig(JointCodesConfig):
    """``etegrec:`` section. Defaults: the paper (Sec. 4.1.4-4.1.5, Scientific: mu = 3e-4, lambda = 1e-4)."""
    section = "etegrec"

    embeddings: str = field("", help="item-embedding file, the tokenizer's input z (`megarec export-embeddings` of a "
                                     "trained SASRec; empty = the pipeline trains the teacher)")
    alternate: bool = field(True, help="alternating optimisation (Sec. 3.4); false = the 'w/o AT' ablation: both "
                                       "sides trained jointly every epoch on every loss")
    cycle: int = field(2, min=2, help="epochs per cycle C (paper: {2, 4}); the first trains the tokenizer")
    tokenizer_lr: float = field(1e-4, min=0.0, help="tokenizer peak learning rate (paper: {5e-4, 1e-4, 5e-5}); the "
                                                   "recommender's is train.lr (paper: {5e-3, 3e-3, 1e-3})")
    rec_weight: float = field(1.0, min=0.0, help="weight of L_REC (Eq. 18)")
    sq_weight: float = field(1.0, min=0.0, help="weight of L_SQ (Eq. 17)")
    lr_schedule: str = field("per_side", choices=("per_side", "shared"),
                             help="per_side: each side's warmup + cosine spans the epochs it trains and advances "
                                  "only in them; shared: one schedule over every epoch, gated per side (the "
                                  "recommender's LR then decays through the tokenizer epochs)")
    sq_reduction: str = field("mean", choices=("mean", "sum"),
                              help="L_SQ over dimensions: mean = per-element MSE, the public code's scale at which "
                                   "mu / lambda were tuned; sum = the squared norms of Eqs. 8-9 as written "
                                   "(d_z and code_dim times larger: the alignment losses then act ~20-60x weaker)")
    sia_weight: float = field(3e-4, min=0.0, help="mu: weight of L_SIA (Eqs. 17-18; 0 = the 'w/o SIA' ablation)")
    psa_weight: float = field(1e-4, min=0.0, help="lambda: weight of L_PSA (Eqs. 17-18; 0 = the 'w/o PSA' ablation)")
    sia_tau: float = field(1.0, min=1e-8, help="temperature of the code distributions of L_SIA (Eq. 6: 1)")
    psa_tau: float = field(0.07, min=1e-8, help="InfoNCE temperature of L_PSA (Eq. 16; 0.07 in the public code)")
    align_warmup_epochs: int = field(10, min=0, help="epochs before the alignment losses start (public code: 10)")
    finetune_epochs: int = field(0, min=0, help="last epochs that train the recommender alone on L_REC, tokenizer "
                                                "frozen (public code: a final stage; paper: not said)")
    proj_hidden: list[int] = field(default_factory=list, min=1,
                                   help="hidden widths of the two alignment MLPs (none = one linear layer)")


# --------------------------------------------------------------------------- schedule (Sec. 3.4)
@dataclass(frozen=True)
class Phase:
    """What one epoch trains."""

    name: str                 # "tokenizer" | "recommender" | "joint" | "finetune"
    train_tokenizer: bool
    train_recommender: bool
    align: bool               # alignment losses on (after the warm-up)
    regenerate: bool          # every item's codes are regenerated after the epoch


def epoch_phase(epoch: int, s: ETEGRecConfig, epochs: int) -> Phase:
    """The phase of ``epoch`` (0-based) of a run of ``epochs`` epochs (Sec. 3.4)."""
    if s.finetune_epochs and epoch >= epochs - s.finetune_epochs:
        return Phase("finetune", False, True, False, False)
    align = epoch >= s.align_warmup_epochs
    if not s.alternate:
        return Phase("joint", True, True, align, True)
    if epoch % s.cycle == 0:
        return Phase("tokenizer", True, False, align, True)
    return Phase("recommender", False, True, align, False)


def loss_weights(phase: Phase, s: ETEGRecConfig) -> dict[str, float]:
    """Weights of the terms in the epoch's objective: L_IT (Eq. 17), L_GR (Eq. 18), their sum (joint)."""
    mu = s.sia_weight if phase.align else 0.0
    lam = s.psa_weight if phase.align else 0.0
    return {"rec": s.rec_weight if phase.train_recommender else 0.0,
            "sq": s.sq_weight if phase.train_tokenizer else 0.0, "sia": mu, "psa": lam}


def lr_gates(phase: Phase) -> dict[str, float]:
    """LR multipliers by group name prefix: the tokenizer's groups are ``tokenizer.*``, the
    recommender side's (T5 and the alignment MLPs) ``decay`` / ``no_decay``."""
    rec = 1.0 if phase.train_recommender else 0.0
    return {"decay": rec, "no_decay": rec, TOKENIZER_PREFIX: 1.0 if phase.train_tokenizer else 0.0}


def part_epochs(s: ETEGRecConfig, epochs: int) -> dict[str, int]:
    """Epochs each side trains, by LR-gate key (:func:`lr_gates`): with ``lr_schedule per_side`` each side's
    warmup + cosine spans its own epochs and advances only in them (the public code runs the tokenizer's
    cosine over its own steps too)."""
    phases = [epoch_phase(e, s, epochs) for e in range(epochs)]
    rec = sum(p.train_recommender for p in phases)
    return {TOKENIZER_PREFIX: sum(p.train_tokenizer for p in phases), "decay": rec, "no_decay": rec}


def combine(terms: ETEGRecTerms, w: dict[str, float]) -> dict[str, torch.Tensor]:
    """The loss dict of a step: the weighted objective under ``"loss"`` and every raw term."""
    total = w["rec"] * terms.rec + w["sq"] * terms.sq + w["sia"] * terms.sia + w["psa"] * terms.psa
    return {"loss": total, "rec": terms.rec, "sq": terms.sq, "recon": terms.recon, "sia": terms.sia,
            "psa": terms.psa}


# --------------------------------------------------------------------------- data / model / task
ETEGRecData = JointData   # no fields of its own


def prepare(cfg: "TrainRecConfig", domains: Sequence[Domain]) -> ETEGRecData:
    """Embeddings, pre-trained tokenizer, initial codes, samples; every input error raised here."""
    s: ETEGRecConfig = cfg.etegrec
    if not s.embeddings or not s.tokenizer:
        raise ConfigError("method etegrec needs etegrec.embeddings (a SASRec's item embeddings: `megarec "
                          "export-embeddings`) and etegrec.tokenizer (an RQ-VAE pre-trained on them: `megarec "
                          "train-tokenizer --embeddings`); the pipeline (`megarec quickstart --methods etegrec`, "
                          "tools/reproduce.py) produces both when they are not given")
    multi = MultiDomain(list(domains))
    keys = multi.item_keys()
    emb, _ = load_item_embeddings(s.embeddings, keys)
    tokenizer, _, _ = RQVAE.load(s.tokenizer)
    if tokenizer.soft:
        raise DataError(f"{s.tokenizer}: a soft RQ-VAE; ETEGRec needs a hard one (rqvae.quantizer: hard)")
    if tokenizer.in_dim != emb.shape[1]:
        raise DataError(f"{s.embeddings} has {emb.shape[1]}-d embeddings but the tokenizer in {s.tokenizer} "
                        f"expects {tokenizer.in_dim}")
    codes, stats = item_codes(tokenizer, emb.float(), keys, s)
    vocab = CodeVocab(vocab_sizes(tokenizer, s))
    table = CodeTable(vocab, codes)
    splits = [leave_one_out(d, max_len=cfg.data.max_len) for d in multi.domains]
    n = cfg.data.max_len
    train = concat_history_samples([history_samples(sp.train, o, n, table) for sp, o in zip(splits, multi.offsets)])
    return ETEGRecData(multi=multi, item_keys=keys, item_emb=emb.float(), tokenizer=tokenizer, vocab=vocab,
                       table=table, train=train,
                       valid=[history_samples(sp.valid, o, n, table) for sp, o in zip(splits, multi.offsets)],
                       test=[history_samples(sp.test, o, n, table) for sp, o in zip(splits, multi.offsets)],
                       code_stats=stats)


def build_model(cfg: "TrainRecConfig", data: ETEGRecData) -> ETEGRecModel:
    s: ETEGRecConfig = cfg.etegrec
    tokenizer = data.tokenizer
    tokenizer.quantizer.dead_code_steps = 0    # no restarts inside joint training (codes would jump)
    model = ETEGRecModel(GenerativeRecommender(s.t5, data.vocab), tokenizer, data.item_emb, data.table.codes,
                         s.proj_hidden, s.sia_tau, s.psa_tau, s.sq_reduction)
    model.train()
    data.model = model
    data.table.model = model
    return model


class Schedule(CodeRegeneration):
    """The epoch hooks: phase, frozen side, LR gates, loss weights, code regeneration and its logs."""

    def __init__(self, cfg: "TrainRecConfig", data: ETEGRecData, num_samples: int) -> None:
        super().__init__(cfg, data, num_samples, "megarec.etegrec")
        self.s: ETEGRecConfig = cfg.etegrec
        self.epochs = cfg.train.epochs
        self.gates: dict[str, float] = {}
        self.weights: dict[str, float] = loss_weights(epoch_phase(0, self.s, self.epochs), self.s)
        self.phase = epoch_phase(0, self.s, self.epochs)
        self.part_epochs = part_epochs(self.s, self.epochs) if self.s.lr_schedule == "per_side" else {}

    @property
    def model(self) -> ETEGRecModel:
        return super().model

    def on_epoch_start(self, epoch: int) -> None:
        self.phase = epoch_phase(epoch, self.s, self.epochs)
        self.weights = loss_weights(self.phase, self.s)
        self.gates.clear()
        self.gates.update(lr_gates(self.phase))
        # After an epoch that trained the tokenizer, every item's codes are regenerated here, at the start
        # of the next epoch: the validation and the export after an epoch see the codes it trained on. A
        # resumed epoch finds them in its checkpoint (codes_epoch) and does not regenerate again.
        if epoch > 0 and epoch_phase(epoch - 1, self.s, self.epochs).regenerate \
                and int(self.model.codes_epoch) < epoch:
            self.regenerate(epoch)
        self.model.set_frozen(tokenizer=not self.phase.train_tokenizer, recommender=not self.phase.train_recommender)
        self.log.info("epoch %d: %s phase (alignment %s)", epoch, self.phase.name, "on" if self.phase.align else "off")

    def on_epoch_end(self, epoch: int) -> None:
        # Unfreeze until the next epoch start: the export after validation takes a parameter from
        # its fp32 master copy only when it requires grad (engine.checkpoint.fp32_master).
        self.model.set_frozen(tokenizer=False, recommender=False)

    def new_codes(self, previous: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        model = self.model
        return item_codes(model.tokenizer, model.item_emb.to(model.tokenizer_dtype()), self.data.item_keys, self.s,
                          previous)

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["targets"])
        return combine(terms, self.weights)


def make_task(cfg: "TrainRecConfig", data: ETEGRecData, device: torch.device, metadata: dict[str, str]) -> TrainTask:
    return joint_task(cfg, data, Schedule(cfg, data, len(data.train)), device, metadata)


# --------------------------------------------------------------------------- inference
def trained_codes(cfg: "TrainRecConfig", state: dict[str, torch.Tensor], multi: MultiDomain) -> CodesFile:
    """The codes a trained model was selected with (its ``item_codes`` buffer) as a codes file: e.g.
    for the paper's 'w/o ETE' ablation, a TIGER trained on ETEGRec's final codes
    (``trained_codes(...).save(path)``, then ``megarec train-rec --method tiger --data.codes path``)."""
    s: ETEGRecConfig = cfg.etegrec
    return shared_trained_codes(state, multi, s.collisions, s.collision_codes, "etegrec")


def load_recommender(cfg: "TrainRecConfig", model_dir: Path, state: dict[str, torch.Tensor], multi: MultiDomain,
                     candidates: np.ndarray):
    """The trained recommender and the codes it was selected with (both in ``model.safetensors``)."""
    return trained_recommender(cfg.etegrec.t5, state, trained_codes(cfg, state, multi), candidates,
                               cfg.data.max_len, cfg.train.beam_size)


# --------------------------------------------------------------------------- pipeline stage
def pretrain_tokenizer(cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path,
                       settings: Sequence[tuple[str, Any]], progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The RQ-VAE pre-trained on the teacher's embeddings of every domain's items, in ``out_dir``
    (``megarec train-tokenizer PATHS --embeddings``; reused when made with the same settings and
    embeddings). ``settings``: ``megarec train-tokenizer`` keys (the ``tokenizer`` stage)."""
    s: ETEGRecConfig = cfg.etegrec
    _, stats = stage_codes(domains, out_dir, settings, base=[("seed", str(cfg.train.seed)),
                                                             ("collisions", s.collisions)],
                           embeddings=s.embeddings, progress=progress)
    return out_dir, stats


class ETEGRecMethod(JointMethod):
    """``method: etegrec`` (plug-in of :mod:`megarec.methods.training`)."""

    name = "etegrec"
    config_section = "etegrec"
    config_cls = ETEGRecConfig

    teacher_key = "embeddings"

    # the module's functions are the plug-in's steps
    prepare = staticmethod(prepare)
    build_model = staticmethod(build_model)
    make_task = staticmethod(make_task)
    pretrain_tokenizer = staticmethod(pretrain_tokenizer)
    load_recommender = staticmethod(load_recommender)
