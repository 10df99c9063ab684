"""UTGRec stage 2 (Zheng et al., Sec. 2.4) as a plug-in of ``train_rec.py``: ``method: utgrec``.

The recommender of UTGRec is TIGER's: a T5 over the items' codes, trained with the
next-item NLL (Eq. 14) and decoded with trie-constrained beam search. This module reuses
:mod:`megarec.methods.tiger.plugin` for all of that (the T5 settings are the ``tiger:`` section)
and adds the transfer pipeline around it (:meth:`UTGRecMethod.prepare_inputs`):

1. ``shards``             item shards of the pre-training domains and of the target domain(s);
2. ``tokenizer_pretrain`` the universal tokenizer pre-trained on the pre-training domains
                          (:func:`megarec.methods.utgrec.tokenizer_run.run`), codes of their items exported
                          over the merged catalogue (unique across domains, Sec. 2.4.1);
3. ``rec_pretrain``       the T5 pre-trained on the mixed code sequences of those domains
                          (:func:`megarec.methods.training.run`, ``method: utgrec``);
4. ``tokenizer_finetune`` the tokenizer fine-tuned on the target (Sec. 2.4.2: ``E^r, E^f`` frozen,
                          ``W`` trained, L fixed) and the target's codes exported;
5. the caller's ``run(cfg)`` fine-tunes the pre-trained T5 on the target's codes
   (``data.codes`` and ``train.init_from`` are set here).

Without pre-training domains (``utgrec.pretrain_paths`` empty: the ``utgrec-nopt`` ablation,
the paper's "w/o PT") the tokenizer is trained on the target only (stage ``tokenizer``) and the
T5 from scratch. Each stage writes its own folder under the pipeline's ``out_dir`` with a
``stage.json`` (settings fingerprint, result); a rerun skips a finished stage made with the same
settings, resumes an unfinished one from its checkpoints, and redoes one whose settings changed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from megarec.config import ConfigError, field
from megarec.data.domain import Domain
from megarec.methods.tiger import plugin as tiger
from megarec.methods.tiger.plugin import TigerMethod
from megarec.methods.utgrec.stages import utgrec_pipeline

if TYPE_CHECKING:
    from megarec.methods.training import TrainRecConfig


@dataclasses.dataclass
class UTGRecRecConfig:
    """``utgrec:`` section of ``train_rec.py`` (the transfer pipeline; the T5 itself is the ``tiger:`` section)."""
    pretrain_paths: list[str] = field(default_factory=list,
                                      help="domains (folders or files) the tokenizer and the T5 are pre-trained on "
                                           "before fine-tuning on data.paths (pipeline only; empty = no pre-training, "
                                           "the utgrec-nopt ablation)")
    pretrain_dir: str = field("", help="folder of the pre-training stages (shards/pretrain, tokenizer_pretrain, "
                                       "rec_pretrain); empty = the run's own folder. Runs that share it (seeds, "
                                       "targets) share one pre-training: a stage is reused when its settings match")
    pretrain_seed: int = field(-1, min=-1, help="seed of the pre-training stages (-1 = train.seed); fix it to share "
                                                "one pre-training between runs of different seeds")
    pretrain_max_users: int = field(0, min=0, help="data.max_users of the pre-training domains: at most this many "
                                                   "users of each, a fixed random subset (0 = all)")


# --------------------------------------------------------------------------- plug-in
class UTGRecMethod(TigerMethod):
    """``method: utgrec`` (plug-in of :mod:`megarec.methods.training`): TIGER's T5 and decoding on UTGRec codes,
    with the multi-domain pre-training / per-domain fine-tuning pipeline of Sec. 2.4."""

    name = "utgrec"
    config_section = "utgrec"
    config_cls = UTGRecRecConfig
    sections_used = ("tiger",)          # the T5 (GenerativeRecommender) settings
    pretrain_key = "utgrec.pretrain_paths"   # run-config key naming the pre-training domains (quickstart, reproduce)
    pretrain_dir_key = "utgrec.pretrain_dir"     # where the pre-training stages go (shared between runs)
    pretrain_seed_key = "utgrec.pretrain_seed"   # their seed (fixed when shared between seeds)

    def prepare_inputs(self, cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path,
                       stages: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        """The pipeline stages (:func:`utgrec_pipeline`); nothing when ``data.codes`` is given (the user
        ran the stages, e.g. one command per stage)."""
        if cfg.data.codes:
            return {}
        return utgrec_pipeline(cfg, domains, out_dir, stages, progress)

    def prepare(self, cfg: "TrainRecConfig", domains: Sequence[Domain]) -> Any:
        if not cfg.data.codes:
            raise ConfigError("method utgrec needs data.codes: the codes file of a UTGRec tokenizer run "
                              "(`megarec/train_tokenizer.py`, RUN/codes.safetensors), or run the whole pipeline "
                              "(`megarec quickstart` / methods.training.run_pipeline)")
        return tiger.prepare(cfg, domains)
