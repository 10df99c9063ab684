"""The recommender's training run on the loop of :mod:`.loop`; it knows no model.

A method hands it a :class:`TrainTask`: how many training samples there are, how
to turn sample indices into a batch, the loss of a batch, and how to evaluate a
split. :class:`Trainer` adds the rest on :class:`~.loop.TrainLoop`: per-rank batch order
(:class:`~.sources.EpochBatches`, resumable), evaluation every ``eval_every`` epochs, early
stopping on a validation metric, export of the best model, and the final test pass with the
best weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megarec.distributed import barrier, get_logger
from megarec.engine.checkpoint import MODEL_FILE, export_safetensors, load_state_dict_into, read_weights, write_json
from megarec.engine.deepspeed_setup import current_lr, refresh_lr
from megarec.engine.loop import HANG_ENV, LoopSettings, LoopTask, TrainLoop  # noqa: F401 (HANG_ENV: tests)
from megarec.engine.sources import EpochBatches
from megarec.engine.tb import TBLogger


@dataclass
class TrainTask:
    """What a method hands the trainer.

    - ``batch(indices)`` -> a batch on this rank's device, for training sample indices;
    - ``loss(engine, batch)`` -> ``{"loss": scalar, <part>: scalar, ...}``; ``loss`` is
      backpropagated, every entry is logged as ``loss/<name>``;
    - ``evaluate(module, split)`` -> metrics (``split`` is ``"valid"`` or ``"test"``);
      a collective: every rank calls it;
    - ``export_metadata``: strings stored in the exported safetensors header;
    - ``lengths``: per-sample lengths; when given (and ``LoopConfig.group_by_length``)
      training batches are grouped by length (:func:`~megarec.engine.sampler.grouped_epoch_batches`);
    - ``on_epoch_start(epoch)`` / ``on_epoch_end(epoch)``: schedule hooks (alternating
      optimisation, regenerating codes), called on every rank (collectives allowed);
      ``on_epoch_end`` runs after the epoch's last step, before validation. A resumed
      run calls ``on_epoch_start`` of the epoch it resumes in again: derive hook state
      from the epoch number and the weights;
    - ``lr_gates``: live learning-rate multipliers by optimiser-group name (see
      :func:`~megarec.engine.deepspeed_setup.gate_factor`; keys are group names or prefixes such as
      ``"tokenizer."``); a hook sets a group's
      gate to 0 to freeze it;
    - ``lr_part_epochs``: group name prefix -> the number of epochs that part trains: its LR schedule
      (warmup + cosine) then spans its own steps and advances only while its gate is > 0
      (:class:`~megarec.engine.deepspeed_setup.PartClocks`); other groups follow the run's schedule.
    """

    num_samples: int
    batch: Callable[[np.ndarray], Any]
    loss: Callable[[Any, Any], dict[str, torch.Tensor]]
    evaluate: Callable[[torch.nn.Module, str], dict[str, float]]
    export_metadata: dict[str, str] = field(default_factory=dict)
    lengths: np.ndarray | None = None
    on_epoch_start: Callable[[int], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None
    lr_gates: dict[str, float] = field(default_factory=dict)
    lr_part_epochs: dict[str, int] = field(default_factory=dict)


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    seed: int = 0
    eval_every: int = 1           # epochs
    patience: int = 10            # evaluations without improvement (0 = never stop early)
    metric: str = "ndcg@10"
    log_every: int = 50           # steps
    save_every_steps: int = 0     # 0 = only at epoch ends
    keep_checkpoints: int = 2
    progress: bool = True
    group_by_length: bool = True  # when the task gives sample lengths
    group_window: int = 50        # global batches per length-sorted window
    cpu_bf16: bool = False        # bf16 autocast of the training forward on CPU ranks
    peak_tflops: float = 0.0      # one device's peak for perf/mfu (0: a known GPU's; none on CPU)


class EarlyStopping:
    """Track the best value of a validation metric; stop after ``patience`` evaluations without improvement."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.bad = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one evaluation; ``True`` when it is a new best (strictly better)."""
        if value > self.best:
            self.best, self.best_epoch, self.bad = float(value), int(epoch), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad = float(s["best"]), int(s["best_epoch"]), int(s["bad"])


class Trainer:
    """Runs :class:`TrainTask` on a DeepSpeed engine through :class:`~.loop.TrainLoop`; writes everything
    under ``run_dir``: ``checkpoints`` (DeepSpeed), ``model/model.safetensors`` (best weights), ``tb``
    (TensorBoard), ``metrics.json`` (valid history, best, test)."""

    def __init__(self, engine, task: TrainTask, cfg: LoopConfig, run_dir: str | Path) -> None:
        self.task = _EpochTask(engine, task, cfg, Path(run_dir))
        settings = LoopSettings(log_every=cfg.log_every, save_every_steps=cfg.save_every_steps,
                                keep_checkpoints=cfg.keep_checkpoints, progress=cfg.progress, cpu_bf16=cfg.cpu_bf16,
                                peak_tflops=cfg.peak_tflops)
        self.loop = TrainLoop(engine, self.task, settings, run_dir, log_name="megarec.train")

    def resume(self) -> bool:
        """Load the latest checkpoint under ``run_dir`` if there is one (collective)."""
        return self.loop.resume()

    def fit(self) -> dict[str, Any]:
        return self.loop.fit()


class _EpochTask(LoopTask):
    """A :class:`TrainTask` as the loop's task: epochs of sample-index batches, the epoch hooks, validation
    every ``eval_every`` epochs with early stopping and best-model export, the test pass at the end."""

    def __init__(self, engine, task: TrainTask, cfg: LoopConfig, run_dir: Path) -> None:
        self.engine, self.task, self.cfg = engine, task, cfg
        self.model_path = run_dir / "model" / MODEL_FILE
        self.run_dir = run_dir
        self.log = get_logger("megarec.train")
        self.source = EpochBatches(task.num_samples, cfg.batch_size, cfg.epochs, cfg.seed,
                                   lengths=task.lengths if cfg.group_by_length else None,
                                   group_window=cfg.group_window, accumulation=engine.gradient_accumulation_steps())
        self.early = EarlyStopping(cfg.patience)
        self.history: list[dict[str, Any]] = []
        self.exported = self.done = False

    def prepare(self, item: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        return self.task.batch(item)     # collation and the copy to the device: timed as data wait

    def loss(self, engine, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return self.task.loss(engine, batch)

    def on_section_start(self, index: int) -> None:
        if self.task.on_epoch_start is not None:
            self.task.on_epoch_start(index)
            refresh_lr(self.engine)          # the hook may have changed lr_gates

    def on_section_end(self, index: int, step: int, tb: TBLogger) -> None:
        if self.task.on_epoch_end is not None:
            self.task.on_epoch_end(index)
        if (index + 1) % self.cfg.eval_every == 0 or index + 1 == self.cfg.epochs:
            self._validate(tb, index, step)

    @property
    def should_stop(self) -> bool:
        return self.done

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "early": self.early.state_dict(), "exported": self.exported,
                "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.exported, self.done = list(state["history"]), bool(state["exported"]), bool(state["done"])
        self.early.load_state_dict(state["early"])

    def _validate(self, tb: TBLogger, epoch: int, step: int) -> None:
        self.engine.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.engine.module, "valid")
        self.engine.train()
        if self.cfg.metric not in metrics:
            raise KeyError(f"evaluate() returned {sorted(metrics)}, no early-stopping metric {self.cfg.metric!r}")
        tb.scalars(_rates(metrics), step, prefix="eval/")
        self.history.append({"epoch": epoch, "step": step, **metrics})
        improved = self.early.update(metrics[self.cfg.metric], epoch)
        self.log.info("epoch %d valid %s%s", epoch, _fmt(metrics), "  (best)" if improved else "")
        if improved:
            export_safetensors(self.engine.module, self.model_path, self.task.export_metadata)
            self.exported = True
        if self.early.should_stop:
            self.log.info("early stop: no %s improvement for %d evaluations (best epoch %d)", self.cfg.metric,
                          self.early.bad, self.early.best_epoch)
            self.done = True

    def finish(self, tb: TBLogger, state: dict[str, Any]) -> dict[str, Any]:
        """Test the best weights; ``metrics.json``."""
        if not self.exported:  # never evaluated (epochs = 0): the current weights are the result
            export_safetensors(self.engine.module, self.model_path, self.task.export_metadata)
            self.exported = True
        barrier()
        weights, _ = read_weights(self.model_path)
        load_state_dict_into(self.engine.module, weights, source=str(self.model_path))
        self.engine.eval()
        with torch.no_grad():
            test = self.task.evaluate(self.engine.module, "test")
        tb.scalars(_rates(test), state["global_step"], prefix="test/")
        self.log.info("test (best epoch %d) %s", self.early.best_epoch, _fmt(test))
        result = {"best_epoch": self.early.best_epoch, "best_valid": self.early.best, "metric": self.cfg.metric,
                  "global_step": state["global_step"], "epochs_run": self.source.epoch,
                  "train_s": state["train_s"], "valid_history": self.history, "test": test,
                  "lr": current_lr(self.engine), "resumed_from_step": state["resumed_from_step"]}
        write_json(self.run_dir / "metrics.json", result)
        barrier()
        return result


def _rates(m: dict[str, float]) -> dict[str, float]:
    """The metrics without the user counts."""
    return {k: v for k, v in m.items() if k.rsplit("/", 1)[-1] != "count"}


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in _rates(m).items())
