"""A generic DeepSpeed training loop that knows no model.

A method hands it a :class:`TrainTask`: how many training samples there are, how
to turn sample indices into a batch, the loss of a batch, and how to evaluate a
split. The loop does the rest: per-rank batch order (resumable), backward/step
through the engine, evaluation every ``eval_every`` epochs, early stopping on a
validation metric, checkpoints (step-based and at every epoch end), export of the
best model, and the final test pass with the best weights.

Hot loop: the loss is accumulated on the device and read once per ``log_every``
steps; nothing else synchronises with the host.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from megarec.distributed import barrier, get_logger, get_rank, get_world_size, is_main_process
from megarec.engine.checkpoint import (MODEL_FILE, export_safetensors, load_checkpoint, load_state_dict_into,
                                       read_weights, save_checkpoint, write_json)
from megarec.engine import preemption
from megarec.engine.deepspeed_setup import current_lr, part_lrs, refresh_lr
from megarec.engine.sampler import epoch_batches, grouped_epoch_batches
from megarec.engine.tb import TBLogger, memory_gb

# Test hook: after this global step (and its checkpoint, if one is due) every rank blocks and
# rank 0 touches run_dir/hanging_at_step<k>, so that a test can SIGKILL the job at a known
# point. Never set in normal use.
HANG_ENV = "MEGAREC_TEST_HANG_AFTER_STEP"


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
      gate to 0 to freeze it.
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
    """Runs :class:`TrainTask` on a DeepSpeed engine; writes everything under ``run_dir``.

    ``run_dir/checkpoints`` (DeepSpeed), ``run_dir/model/model.safetensors`` (best weights),
    ``run_dir/tb`` (TensorBoard), ``run_dir/metrics.json`` (valid history, best, test).
    """

    def __init__(self, engine, task: TrainTask, cfg: LoopConfig, run_dir: str | Path) -> None:
        self.engine, self.task, self.cfg = engine, task, cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model_path = self.run_dir / "model" / MODEL_FILE
        self.early = EarlyStopping(cfg.patience)
        self.log = get_logger("megarec.train")
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "global_step": 0, "done": False,
                                      "train_s": 0.0, "history": [], "early": self.early.state_dict(),
                                      "exported": False, "window": _empty_window()}
        self._resumed_from: int | None = None

    # ------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Load the latest checkpoint under ``run_dir`` if there is one (collective)."""
        loaded = load_checkpoint(self.engine, self.ckpt_dir)
        if loaded is None:
            self.log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return False
        loaded.setdefault("window", _empty_window())
        self.state = loaded
        self.early.load_state_dict(loaded["early"])
        self._resumed_from = int(loaded["global_step"])
        self.log.info("resumed at epoch %d, batch %d, step %d", loaded["epoch"], loaded["batch"],
                      loaded["global_step"])
        return True

    def _epoch_batches(self, epoch: int, rank: int, world: int) -> list[np.ndarray]:
        cfg, lengths = self.cfg, self.task.lengths
        if lengths is not None and cfg.group_by_length:
            return grouped_epoch_batches(lengths, cfg.batch_size, epoch, cfg.seed, rank, world, cfg.group_window)
        return epoch_batches(self.task.num_samples, cfg.batch_size, epoch, cfg.seed, rank, world)

    def _save(self) -> None:
        self.state["early"] = self.early.state_dict()
        save_checkpoint(self.engine, self.ckpt_dir, dict(self.state), keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg, engine, st = self.cfg, self.engine, self.state
        tb = TBLogger(self.run_dir / "tb", purge_step=st["global_step"] + 1 if self._resumed_from is not None else None)
        hang_at = int(os.environ.get(HANG_ENV, "0") or 0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16 and engine.device.type == "cpu")
        rank, world = get_rank(), get_world_size()
        try:
            while st["epoch"] < cfg.epochs and not st["done"]:
                epoch = st["epoch"]
                batches = self._epoch_batches(epoch, rank, world)
                engine.train()
                if self.task.on_epoch_start is not None:
                    self.task.on_epoch_start(epoch)
                    refresh_lr(engine)          # the hook may have changed lr_gates
                # The logging window survives checkpoints, so that windows after a resume
                # average the same steps as in an uninterrupted run.
                sums, steps, samples = _restore_window(st["window"], engine.device)
                t_window = time.perf_counter()
                bar = tqdm(total=len(batches), initial=st["batch"], desc=f"epoch {epoch}", leave=False,
                           disable=not (cfg.progress and is_main_process()))
                for b in range(st["batch"], len(batches)):
                    with autocast:
                        out = self.task.loss(engine, self.task.batch(batches[b]))
                    engine.backward(out["loss"])
                    engine.step()
                    for k, v in out.items():
                        sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
                    steps += 1
                    samples += len(batches[b]) * world
                    st["global_step"] += 1
                    st["batch"] = b + 1
                    bar.update(1)
                    if cfg.log_every and st["global_step"] % cfg.log_every == 0:
                        t_window = self._log_train(tb, sums, steps, samples, t_window, bar)
                        sums, steps, samples = {}, 0, 0
                        st["window"] = _empty_window()
                    if cfg.save_every_steps and st["global_step"] % cfg.save_every_steps == 0 \
                            and b + 1 < len(batches):
                        _synchronize()
                        dt = time.perf_counter() - t_window
                        st["train_s"] += dt
                        st["window"] = _window_state(sums, steps, samples, st["window"]["seconds"] + dt)
                        self._save()
                        t_window = time.perf_counter()
                    if hang_at and st["global_step"] == hang_at:
                        self._hang(tb)
                    if preemption.should_stop(st["global_step"]):   # collective; False unless a guard is installed
                        dt = time.perf_counter() - t_window
                        st["train_s"] += dt
                        st["window"] = _window_state(sums, steps, samples, st["window"]["seconds"] + dt)
                        self._preempt()
                bar.close()
                if steps:
                    self._log_train(tb, sums, steps, samples, t_window, None)
                else:
                    st["train_s"] += time.perf_counter() - t_window
                st["window"] = _empty_window()
                if self.task.on_epoch_end is not None:
                    self.task.on_epoch_end(epoch)
                st["epoch"], st["batch"] = epoch + 1, 0
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    self._validate(tb, epoch)
                self._save()
            return self._finish(tb)
        finally:
            tb.close()

    def _hang(self, tb: TBLogger) -> None:
        """Test hook (``MEGAREC_TEST_HANG_AFTER_STEP``): flush logs, say so, wait to be killed (or, under a
        preemption guard, for the preemption signal: the loop then checkpoints this step and exits)."""
        tb.flush()
        barrier()
        if is_main_process():
            (self.run_dir / f"hanging_at_step{self.state['global_step']}").touch()
        while not preemption.received():
            time.sleep(0.2)

    def _preempt(self) -> None:
        """A preemption signal reached some rank (:mod:`.preemption`): checkpoint this step on every
        rank, then raise :class:`~.preemption.Preempted` (exit code 75; the launcher requeues)."""
        self._save()
        step = self.state["global_step"]
        self.log.warning("preemption signal: checkpoint at step %d saved in %s, exiting %d", step, self.ckpt_dir,
                         preemption.EXIT_CODE)
        raise preemption.preempted(step)

    def _log_train(self, tb: TBLogger, sums: dict[str, torch.Tensor], steps: int, samples: int, t_window: float,
                   bar) -> float:
        """Close a logging window: one host sync (the mean losses), training time and throughput
        up to now, TensorBoard scalars. Returns the start of the next window."""
        means = {k: float(v) / steps for k, v in sums.items()}
        now = time.perf_counter()
        dt = now - t_window
        self.state["train_s"] += dt
        dt += self.state["window"]["seconds"]   # time of this window spent before a checkpoint
        step = self.state["global_step"]
        tb.scalars(means, step, prefix="loss/")
        tb.scalars({"samples_per_s": samples / max(dt, 1e-9), "memory_gb": memory_gb()}, step, prefix="perf/")
        tb.scalars(part_lrs(self.engine), step, prefix="train/")
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}")
        return now

    def _validate(self, tb: TBLogger, epoch: int) -> None:
        self.engine.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.engine.module, "valid")
        self.engine.train()
        if self.cfg.metric not in metrics:
            raise KeyError(f"evaluate() returned {sorted(metrics)}, no early-stopping metric {self.cfg.metric!r}")
        tb.scalars(_rates(metrics), self.state["global_step"], prefix="eval/")
        self.state["history"].append({"epoch": epoch, "step": self.state["global_step"], **metrics})
        improved = self.early.update(metrics[self.cfg.metric], epoch)
        self.log.info("epoch %d valid %s%s", epoch, _fmt(metrics), "  (best)" if improved else "")
        if improved:
            export_safetensors(self.engine.module, self.model_path, self.task.export_metadata)
            self.state["exported"] = True
        if self.early.should_stop:
            self.log.info("early stop: no %s improvement for %d evaluations (best epoch %d)", self.cfg.metric,
                          self.early.bad, self.early.best_epoch)
            self.state["done"] = True

    def _finish(self, tb: TBLogger) -> dict[str, Any]:
        if not self.state["exported"]:  # never evaluated (epochs = 0): the current weights are the result
            export_safetensors(self.engine.module, self.model_path, self.task.export_metadata)
            self.state["exported"] = True
        barrier()
        state, _ = read_weights(self.model_path)
        load_state_dict_into(self.engine.module, state, source=str(self.model_path))
        self.engine.eval()
        with torch.no_grad():
            test = self.task.evaluate(self.engine.module, "test")
        tb.scalars(_rates(test), self.state["global_step"], prefix="test/")
        self.log.info("test (best epoch %d) %s", self.early.best_epoch, _fmt(test))
        result = {"best_epoch": self.early.best_epoch, "best_valid": self.early.best, "metric": self.cfg.metric,
                  "global_step": self.state["global_step"], "epochs_run": self.state["epoch"],
                  "train_s": self.state["train_s"], "valid_history": self.state["history"], "test": test,
                  "lr": current_lr(self.engine), "resumed_from_step": self._resumed_from}
        write_json(self.run_dir / "metrics.json", result)
        barrier()
        return result


def _empty_window() -> dict[str, Any]:
    return {"sums": {}, "steps": 0, "samples": 0, "seconds": 0.0}


def _window_state(sums: dict[str, torch.Tensor], steps: int, samples: int, seconds: float) -> dict[str, Any]:
    """The open logging window as plain numbers (fp32 sums survive the round trip exactly)."""
    return {"sums": {k: float(v) for k, v in sums.items()}, "steps": steps, "samples": samples, "seconds": seconds}


def _restore_window(w: dict[str, Any], device) -> tuple[dict[str, torch.Tensor], int, int]:
    sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in w["sums"].items()}
    return sums, int(w["steps"]), int(w["samples"])


def _synchronize() -> None:
    """Wait for queued device work (a no-op on CPU) so that timings cover it."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def _rates(m: dict[str, float]) -> dict[str, float]:
    """The metrics without the user counts."""
    return {k: v for k, v in m.items() if k.rsplit("/", 1)[-1] != "count"}


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in _rates(m).items())
