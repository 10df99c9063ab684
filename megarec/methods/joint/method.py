"""What the two joint plug-ins (ETEGRec, UniGRec) share as plug-ins: their data's common fields, the
training task over a schedule of epoch hooks, the tokenizer's learning rate, and the teacher stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from megarec.config import ConfigError
from megarec.data.code_vocab import CodeVocab
from megarec.data.domain import Domain, MultiDomain
from megarec.engine.trainer import TrainTask
from megarec.methods.base import Method
from megarec.methods.joint.evaluation import evaluate_on_codes
from megarec.methods.joint.samples import CodeTable, HistorySamples
from megarec.methods.joint.stages import teacher_embeddings
from megarec.tokenizer.rqvae import RQVAE

TOKENIZER_PREFIX = "tokenizer."   # parameter names (and optimiser groups) of the tokenizer side


@dataclass(kw_only=True)
class JointData:
    """A joint method's data: the catalogue, its tokenizer input, codes and samples."""

    multi: MultiDomain
    item_keys: list[str]
    item_emb: torch.Tensor          # the tokenizer's input for every item
    tokenizer: RQVAE
    vocab: CodeVocab
    table: CodeTable
    train: HistorySamples
    valid: list[HistorySamples]
    test: list[HistorySamples]
    code_stats: dict[str, Any]
    model: Any = field(default=None)   # set by build_model: the epoch hooks and the samples read its codes

    @property
    def domain_names(self) -> list[str]:
        return self.multi.names

    def domain_items(self, d: int) -> np.ndarray:
        """Global indices of domain ``d``'s items (its ranking candidates)."""
        return self.multi.domain_items(d)


def joint_task(cfg: Any, data: JointData, schedule: Any, device: torch.device, metadata: dict[str, str]) -> TrainTask:
    """The task of a joint method: ``schedule`` holds the epoch hooks, the step's loss and (optionally)
    ``gates``, live LR multipliers, and ``part_epochs``, the epochs each gated part trains (its own LR
    schedule); evaluation runs on the model's current codes."""

    def run_eval(module: Any, split: str) -> dict[str, float]:
        per_domain = data.valid if split == "valid" else data.test
        return evaluate_on_codes(module, data, per_domain, cfg.train.beam_size, cfg.train.eval_batch_size, device)

    task = TrainTask(num_samples=len(data.train), batch=lambda idx: data.train.batch(idx, device),
                     loss=schedule.loss, evaluate=run_eval, export_metadata=metadata, lengths=data.train.lengths,
                     on_epoch_start=schedule.on_epoch_start, on_epoch_end=getattr(schedule, "on_epoch_end", None),
                     lr_gates=getattr(schedule, "gates", {}), lr_part_epochs=getattr(schedule, "part_epochs", {}))
    task.schedule = schedule  # type: ignore[attr-defined]   # for tests and tools
    return task


class JointMethod(Method):
    """Base of the joint plug-ins: generative, the tokenizer at its own learning rate, a SASRec teacher stage."""

    generative = True
    frozen_tokenizer_allowed: ClassVar[bool] = False   # tokenizer_lr 0 = no tokenizer group (the model freezes it)

    def param_groups(self, cfg: Any, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The recommender side at ``train.lr``, the tokenizer (``tokenizer.*``) at the section's ``tokenizer_lr``."""
        from megarec.engine.param_groups import param_groups

        lr = self.section(cfg).tokenizer_lr
        if cfg.train.lr <= 0:
            raise ConfigError(f"train.lr must be > 0 for {self.name} (the tokenizer's lr is a multiple of it)")
        if lr <= 0 and not self.frozen_tokenizer_allowed:
            raise ConfigError(f"{self.config_section}.tokenizer_lr must be > 0")
        return param_groups(model, cfg.train.weight_decay, {TOKENIZER_PREFIX: lr / cfg.train.lr} if lr > 0 else {})

    teacher_key: ClassVar[str] = ""   # the section's key that holds the SASRec teacher's item-embedding file

    def uses_teacher(self, section: Any) -> bool:
        return True

    def pretrain_tokenizer(self, cfg: Any, domains: Sequence[Domain], out_dir: Path,
                           settings: Sequence[tuple[str, Any]], progress: bool) -> tuple[Path, dict[str, Any]]:
        """The ``tokenizer`` stage: the method's RQ-VAE in ``out_dir``; its folder and statistics."""
        raise NotImplementedError

    def prepare_inputs(self, cfg: Any, domains: Sequence[Domain], out_dir: Path, stages: dict[str, Any],
                       progress: bool = True) -> dict[str, Any]:
        """The stages whose results the section does not name: the SASRec teacher
        (:func:`~megarec.methods.joint.stages.teacher_embeddings`), then the tokenizer."""
        s = self.section(cfg)
        out: dict[str, Any] = {}
        if self.uses_teacher(s) and not getattr(s, self.teacher_key):
            path, out["teacher"] = teacher_embeddings(cfg, out_dir / "teacher", stages.get("teacher", []), progress)
            setattr(s, self.teacher_key, str(path.resolve()))
        if not s.tokenizer:
            folder, out["tokenizer"] = self.pretrain_tokenizer(cfg, domains, out_dir / "tokenizer",
                                                               stages.get("tokenizer", []), progress)
            s.tokenizer = str(folder.resolve())
        return out
