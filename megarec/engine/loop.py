"""The training loop every entry point runs; it knows no model.

:class:`TrainLoop` runs a :class:`LoopTask` on a DeepSpeed engine: micro-batches from the task's
:class:`~megarec.engine.sources.BatchSource`, forward / backward / ``engine.step()`` (gradient
accumulation: one optimizer step every ``accumulation`` micro-batches; every step count, cadence
and TensorBoard step is an optimizer step), a logging window (saved in checkpoints, so windows after
a resume equal an uninterrupted run's), per-step evaluation, checkpoints (every ``save_every_steps``
and at each section end), preemption (:mod:`.preemption`), resume and a progress bar.

Hot loop: losses are accumulated on the device and read once per logging window (after one device
synchronisation, so that the window's seconds cover its queued work).

Host syncs per step, after issue 19 (each drains the GPU queue and stalls ZeRO-3 prefetch). Gone:
the InfoNCE size all-gathers and their ``.item()`` (sizes gathered on the host, over gloo, once per
loss: :func:`megarec.distributed.gather_sizes`), the ``bool()`` check in the code-token lookup
(``torch._assert_async``), the ``nonzero`` of the text loss (masked, static shapes), the code-count
``bincount`` calls (``index_add_``), the preemption flag's device all-reduce + ``.item()`` (a CPU flag on
gloo), the loss ``.item()`` calls (device sums, read at the window). What remains, and why:

- the logging window (every ``log_every`` steps): one device synchronisation, the loss sums, the
  task's window scalars (code counts, token counts): the numbers themselves;
- checkpoints, evaluation, the preemption stop (not per step);
- host collectives that never wait for the GPU: the preemption flag (every
  ``MEGAREC_PREEMPT_CHECK_EVERY`` steps) and InfoNCE's batch sizes, on gloo;
- DeepSpeed's own step: fp16 loss-scale overflow checks and, with ``gradient_clipping``, the global
  norm (bf16 without clipping has none); ZeRO-3's parameter fetches are device collectives;
- UTGRec with ``codebook.dead_code_steps > 0`` (off by default): the dead-code set each step
  (``TreeCodebooks.restart_dead_codes``), the first quantised step's k-means (once);
- blocking host-to-device copies of a batch from pageable memory (``Tensor.to(device)`` without
  ``non_blocking``) synchronise the stream: the recommenders' batches copy with ``non_blocking=True``.

``tests/test_no_host_sync.py`` counts ``Tensor.item`` / ``__bool__`` / ``tolist`` / ``nonzero`` /
``bincount`` and device collectives through a few steps and fails if one comes back.

Time split (window scalars ``perf/*``): ``data_wait_frac`` is the host time in ``next(batches)`` and
:meth:`LoopTask.prepare` over the window's seconds; ``mfu`` / ``hfu`` the model / hardware FLOPs
(:mod:`megarec.engine.flops`, counted once on a micro-batch, reused per sample) over the window's
seconds times the peak (``LoopSettings.peak_tflops``, else the GPU's by name; no MFU without one);
``step_s`` the seconds per optimizer step. Communication is not split off: DeepSpeed's collectives run
on their own streams inside backward / step and cannot be timed apart without a sync per step.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megarec.distributed import barrier, get_logger, get_world_size, is_main_process
from megarec.engine import preemption
from megarec.engine.checkpoint import load_checkpoint, save_checkpoint
from megarec.engine.deepspeed_setup import part_lrs
from megarec.engine.sources import BatchSource, Section
from megarec.engine.tb import TBLogger, memory_gb

# Test hook: after this global step (and its checkpoint, if one is due) every rank blocks and
# rank 0 touches run_dir/hanging_at_step<k>, so that a test can SIGKILL the job at a known
# point. Never set in normal use.
HANG_ENV = "MEGAREC_TEST_HANG_AFTER_STEP"


@dataclass
class LoopSettings:
    log_every: int = 50           # optimizer steps per logging window (0: section ends only)
    save_every_steps: int = 0     # 0 = only at section ends
    eval_every_steps: int = 0     # LoopTask.evaluate_step cadence (0 = never)
    keep_checkpoints: int = 2
    progress: bool = True
    cpu_bf16: bool = False        # bf16 autocast of the training forward on CPU ranks
    peak_tflops: float = 0.0      # peak TFLOP/s of one device for perf/mfu (0: a known GPU's, none on CPU)


class LoopTask:
    """What a training run hands the loop; override what applies. Hooks run on every rank
    (collectives allowed); ``step`` is the number of optimizer steps done."""

    source: BatchSource

    def loss(self, engine: Any, item: Any, step: int) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, <part>: scalar}`` of one micro-batch of optimizer step ``step`` (0-based);
        ``loss`` is backpropagated, every entry is logged as ``loss/<name>``."""
        raise NotImplementedError

    def prepare(self, item: Any, step: int) -> Any:
        """Host work that turns a source item into :meth:`loss`'s input (collation, host-to-device copies); the
        loop times it as data wait. Default: the item itself."""
        return item

    def samples(self, item: Any) -> int:
        """Training samples in a micro-batch on this rank (``item``: the source's, before :meth:`prepare`)."""
        return len(item)

    def measurable(self, step: int) -> bool:
        """Whether a micro-batch of ``step`` is typical work, fit for the one FLOP count of ``perf/mfu``
        (not a step with one-off work such as a k-means initialisation)."""
        return True

    def after_step(self, step: int, out: dict[str, torch.Tensor]) -> None:
        """After each optimizer step (``out``: the last micro-batch's losses)."""

    def on_section_start(self, index: int) -> None:
        """Before a section's first step (again in a resumed run)."""

    def on_section_end(self, index: int, step: int, tb: TBLogger) -> None:
        """After a section's last step and logging window, before its checkpoint."""

    def evaluate_step(self, step: int, tb: TBLogger) -> None:
        """Every ``LoopSettings.eval_every_steps`` optimizer steps."""

    def window_scalars(self, means: dict[str, float], seconds: float) -> dict[str, float]:
        """Extra scalars (full tags) when a logging window closes; ``means``: its mean losses."""
        return {}

    def window_state(self) -> dict[str, Any]:
        """Task-owned accumulators of the open logging window, as plain values (for checkpoints)."""
        return {}

    def load_window_state(self, state: dict[str, Any]) -> None: ...

    def reset_window(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Task-owned state that goes into every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def should_stop(self) -> bool:
        """Checked before each section (early stopping)."""
        return False

    def finish(self, tb: TBLogger, state: dict[str, Any]) -> Any:
        """After training, TensorBoard still open; its value is :meth:`TrainLoop.fit`'s."""
        return state


class _Window:
    """The open logging window: loss sums (on the device), micro-batches, samples, training seconds, seconds
    waiting for data."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in saved.get("sums", {}).items()}
        self.steps, self.samples = int(saved.get("steps", 0)), int(saved.get("samples", 0))
        self.seconds = float(saved.get("seconds", 0.0))
        self.data_s = float(saved.get("data_s", 0.0))
        self.t = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], samples: int) -> None:
        for k, v in out.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.samples += samples

    def lap(self) -> float:
        """Seconds since the last lap (or restart), added to the window's."""
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.seconds += dt
        return dt

    def restart(self) -> None:
        """Start the clock again (after time that is not training: checkpoints, evaluation)."""
        self.t = time.perf_counter()

    def state(self) -> dict[str, Any]:
        """As plain numbers (fp32 sums survive the round trip exactly)."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps, "samples": self.samples,
                "seconds": self.seconds, "data_s": self.data_s}


class TrainLoop:
    """Runs ``task`` on ``engine``; checkpoints in ``run_dir/checkpoints``, TensorBoard in ``run_dir/tb``."""

    def __init__(self, engine: Any, task: LoopTask, settings: LoopSettings, run_dir: str | Path,
                 log_name: str = "megarec.train") -> None:
        self.engine, self.task, self.cfg, self.source = engine, task, settings, task.source
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log = get_logger(log_name)
        self.state: dict[str, Any] = {"global_step": 0, "train_s": 0.0}
        self.resumed_from: int | None = None
        self.window = _Window(engine.device)
        self.accumulation = int(self.source.accumulation)
        from megarec.engine.flops import peak_flops

        self.peak = peak_flops(engine.device, settings.peak_tflops)   # FLOP/s of one device, None: no MFU
        self.flops: dict[str, float] | None = None                     # per sample, once counted

    # ------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Load the latest checkpoint under ``run_dir`` if there is one (collective)."""
        loaded = load_checkpoint(self.engine, self.ckpt_dir)
        if loaded is None:
            self.log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return False
        if "source" not in loaded:
            from megarec.data.domain import DataError

            raise DataError(f"{self.ckpt_dir}: a checkpoint of an older MegaRec (before engine/loop.py); "
                            "resume it with that version")
        self.source.load_state_dict(loaded.pop("source"))
        self.task.load_state_dict(loaded.pop("task"))
        clocks = loaded.pop("lr_clocks", None)
        if clocks is not None and getattr(self.engine, "lr_clocks", None) is not None:
            self.engine.lr_clocks.load_state_dict(clocks)
        w = loaded.pop("window")
        self.window = _Window(self.engine.device, w)
        self.task.load_window_state(w.get("task", {}))
        self.state = loaded
        self.resumed_from = int(loaded["global_step"])
        self.log.info("resumed at step %d (%s)", self.resumed_from, self.source)
        return True

    def _save(self) -> None:
        state = {**self.state, "source": self.source.state_dict(), "task": self.task.state_dict(),
                 "window": {**self.window.state(), "task": self.task.window_state()}}
        if getattr(self.engine, "lr_clocks", None) is not None:   # parts with LR schedules of their own
            state["lr_clocks"] = self.engine.lr_clocks.state_dict()
        save_checkpoint(self.engine, self.ckpt_dir, state, keep=self.cfg.keep_checkpoints)

    def _pause(self, sync: bool = False) -> None:
        """Book the window's training time so far (before a checkpoint or an evaluation)."""
        if sync:
            _synchronize()
        self.state["train_s"] += self.window.lap()

    # ------------------------------------------------------------------ loop
    def fit(self) -> Any:
        """Train to the end of the source (or an early stop); returns ``task.finish``'s value."""
        st = self.state
        tb = TBLogger(self.run_dir / "tb", purge_step=st["global_step"] + 1 if self.resumed_from is not None else None)
        try:
            while not self.task.should_stop:
                section = self.source.section(st["global_step"])
                if section is None:
                    break
                self._section(section, tb)
            return self.task.finish(tb, {**st, "resumed_from_step": self.resumed_from})
        finally:
            tb.close()

    def _section(self, sec: Section, tb: TBLogger) -> None:
        cfg, engine, task, st = self.cfg, self.engine, self.task, self.state
        hang_at = int(os.environ.get(HANG_ENV, "0") or 0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16 and engine.device.type == "cpu")
        world = get_world_size()
        engine.train()
        task.on_section_start(sec.index)
        self.window.restart()
        bar = tqdm(total=sec.total, initial=sec.done, desc=sec.desc, leave=sec.leave,
                   disable=not (cfg.progress and is_main_process()))
        items = sec.items
        for done in range(sec.done + 1, sec.total + 1):
            step = st["global_step"]
            for _ in range(self.accumulation):
                t0 = time.perf_counter()
                item = next(items)
                inputs = task.prepare(item, step)
                self.window.data_s += time.perf_counter() - t0
                if self.peak is not None and self.flops is None and task.measurable(step):
                    out = self._counted_step(inputs, step, task.samples(item), autocast)
                else:
                    with autocast:
                        out = task.loss(engine, inputs, step)
                    engine.backward(out["loss"])
                engine.step()          # DeepSpeed steps the optimizer at accumulation boundaries
                self.window.add(out, task.samples(item) * world)
            st["global_step"] = gs = step + 1
            task.after_step(gs, out)
            bar.update(1)
            last = done == sec.total
            if (cfg.log_every and gs % cfg.log_every == 0) or last:
                self._log_window(tb, bar)
            if cfg.eval_every_steps and gs % cfg.eval_every_steps == 0:
                self._pause()
                task.evaluate_step(gs, tb)
                self.window.restart()
            if cfg.save_every_steps and gs % cfg.save_every_steps == 0 and not last:
                self._pause(sync=True)
                self._save()
                self.window.restart()
            if hang_at and gs == hang_at:
                self._hang(tb)
            if preemption.should_stop(gs):   # collective; False unless a guard is installed
                self._pause()
                self._preempt()
        bar.close()
        if hasattr(items, "close"):
            items.close()
        if self.window.steps:   # a window left open (a resumed run whose checkpoint had one at the end)
            self._log_window(tb, None)
        else:
            self._pause()
        self.source.end_section()
        task.on_section_end(sec.index, st["global_step"], tb)
        self._save()

    def _counted_step(self, inputs: Any, step: int, samples: int, autocast) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch under the FLOP counter; keeps FLOPs per sample."""
        from megarec.engine.flops import StepFlopCounter

        counter = StepFlopCounter()
        with counter:
            with autocast:
                out = self.task.loss(self.engine, inputs, step)
            counter.phase = "backward"
            self.engine.backward(out["loss"])
        n = max(1, samples)
        self.flops = {"model": counter.model_flops / n, "hardware": counter.hardware_flops / n}
        self.log.info("FLOPs per sample: %.4g model (forward %.4g, backward %.4g), %.4g recomputed (checkpointing)",
                      self.flops["model"], counter.counts["forward"] / n, counter.counts["backward"] / n,
                      counter.counts["recompute"] / n)
        return out

    def perf_scalars(self, w: "_Window") -> dict[str, float]:
        """``perf/*`` of a closed window (tags without the prefix)."""
        secs = max(w.seconds, 1e-9)
        out = {"samples_per_s": w.samples / secs, "memory_gb": memory_gb(), "data_wait_frac": w.data_s / secs,
               "step_s": w.seconds / max(1, w.steps // self.accumulation)}
        if self.peak is not None and self.flops is not None:
            world = get_world_size()   # w.samples counts every rank's; FLOPs per sample were this rank's
            out["mfu"] = self.flops["model"] * w.samples / (secs * world * self.peak)
            out["hfu"] = self.flops["hardware"] * w.samples / (secs * world * self.peak)
            out["tflops"] = self.flops["model"] * w.samples / (secs * world) / 1e12   # per device
        return out

    def _log_window(self, tb: TBLogger, bar) -> None:
        """Close the logging window: one device sync (so that its seconds cover its queued work), one host
        read (the mean losses), training time and throughput up to now, TensorBoard scalars, a console line;
        then open the next one."""
        w = self.window
        _synchronize()
        self.state["train_s"] += w.lap()
        means = {k: float(v) / w.steps for k, v in w.sums.items()}
        step = self.state["global_step"]
        perf = self.perf_scalars(w)
        tb.scalars(means, step, prefix="loss/")
        tb.scalars(perf, step, prefix="perf/")
        tb.scalars(part_lrs(self.engine), step, prefix="train/")
        tb.scalars(self.task.window_scalars(means, w.seconds), step)
        mfu = f" mfu {perf['mfu']:.3f}" if "mfu" in perf else ""
        self.log.info("step %d loss %.4f %.1f samples/s %.3f s/step data wait %.2f%s", step, means["loss"],
                      perf["samples_per_s"], perf["step_s"], perf["data_wait_frac"], mfu)
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", **({"mfu": f"{perf['mfu']:.3f}"} if mfu else {}),
                            wait=f"{perf['data_wait_frac']:.2f}")
        self.window = _Window(self.engine.device)
        self.task.reset_window()

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


def _synchronize() -> None:
    """Wait for queued device work (a no-op on CPU) so that timings cover it."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()
