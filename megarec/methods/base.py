"""The shape of a recommender method: what ``train_rec.py`` asks of a plug-in.

``train_rec.py`` and the trainer know no method by name. A method is one module
under ``megarec/methods/`` that defines a :class:`Method` subclass and registers
it in :data:`megarec.methods.REGISTRY`; its presets are YAML files shipped in the
package (``megarec/configs/<method>/<profile>.yaml``, see :mod:`megarec.methods.profiles`).

A method declares

- ``config_section`` / ``config_cls``: its own section of the run config (e.g.
  ``tiger: T5RecConfig``); ``TrainRecConfig`` is assembled from the registry;
- ``prepare(cfg, domains)``: its data (every input error raised here, before compute);
- ``build_model(cfg, data)``: the module DeepSpeed wraps (same seed on every rank);
- ``param_groups(cfg, model)``: optimiser groups (own learning rates, no-decay rules);
- ``make_task(cfg, data, device, metadata)``: the :class:`~megarec.engine.trainer.TrainTask`
  (batch, loss, evaluation, epoch hooks, sample lengths for length-grouped batches);
- ``model_files``/``write_model_files``: what its ``model/`` folder holds beside
  ``model.safetensors`` and ``config.yaml``; ``load_recommender``: how ``megarec
  recommend`` loads it back from that folder;
- ``prepare_inputs(cfg, domains, out_dir, stages, progress)``: the pipeline stages
  that must run before training when a user gives only data (a tokenizer, a teacher):
  they fill the config (e.g. ``data.codes``) and return their statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from megarec.data.domain import Domain, MultiDomain
    from megarec.engine.trainer import TrainTask


class Recommender(Protocol):
    """A trained model for ``megarec recommend``."""

    def recommend(self, histories: Sequence[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global item indices ``[B, k]`` (-1 = none) and their scores."""


class Method:
    """Base class of a recommender plug-in; subclasses override what they need."""

    name: ClassVar[str] = ""
    config_section: ClassVar[str | None] = None   # attribute of TrainRecConfig holding this method's section
    config_cls: ClassVar[type | None] = None      # the dataclass of that section
    generative: ClassVar[bool] = False            # decodes codes: batches grouped by length by default
    model_files: ClassVar[tuple[str, ...]] = ()   # files next to model.safetensors that load_recommender reads
    sections_used: ClassVar[tuple[str, ...]] = () # other methods' config sections this one reads (e.g. a teacher)

    def section(self, cfg: Any) -> Any:
        """This method's config section of ``cfg`` (``None`` when it has none)."""
        return getattr(cfg, self.config_section) if self.config_section else None

    # ------------------------------------------------------------------ pipeline
    def prepare_inputs(self, cfg: Any, domains: Sequence["Domain"], out_dir: Path, stages: dict[str, Any],
                       progress: bool = True) -> dict[str, Any]:
        """Run the stages this method needs before training (tokenizer, teacher, ...), filling
        ``cfg`` in place (e.g. ``cfg.data.codes``); ``stages`` are the profile's settings for
        them. Returns their statistics (stored under these keys in the pipeline's result)."""
        return {}

    # ------------------------------------------------------------------ training
    def prepare(self, cfg: Any, domains: Sequence["Domain"]) -> Any:
        raise NotImplementedError

    def build_model(self, cfg: Any, data: Any) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, cfg: Any, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups (default: :func:`~megarec.engine.param_groups.param_groups`
        with ``train.weight_decay``: no decay on norms, biases and relative-position tables)."""
        from megarec.engine.param_groups import param_groups

        return param_groups(model, cfg.train.weight_decay)

    def make_task(self, cfg: Any, data: Any, device: torch.device, metadata: dict[str, str]) -> "TrainTask":
        raise NotImplementedError

    # ------------------------------------------------------------------ model folder
    def write_model_files(self, cfg: Any, model_dir: Path) -> None:
        """Copy what :attr:`model_files` names into ``model_dir`` (rank 0, before training)."""

    def load_recommender(self, cfg: Any, model_dir: Path, state: dict[str, torch.Tensor], multi: "MultiDomain",
                         candidates: np.ndarray) -> Recommender:
        raise NotImplementedError
