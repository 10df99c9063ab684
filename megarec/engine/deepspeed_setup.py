"""DeepSpeed setup: process group, ``"auto"`` values of a ds config, engine.

A ds config (``ds_configs/*.json``) holds the real cluster settings (ZeRO stage,
offload, bf16, clipping, optimizer, scheduler); values that depend on the run
are written ``"auto"`` and filled here from the training config:

- ``train_micro_batch_size_per_gpu`` <- batch size, ``gradient_accumulation_steps`` <- 1,
  ``train_batch_size`` is derived by DeepSpeed (an ``"auto"`` there is dropped);
- ``optimizer.params.lr`` / ``weight_decay``;
- ``bf16.enabled: "auto"`` -> on when the accelerator is not the CPU and supports
  bf16. On CPU training runs in fp32 (DeepSpeed's own bf16 path is not meant for
  CPU, and plain DeepSpeed does not accept ``"auto"``, so we resolve it here);
- on the CPU accelerator without optimizer offload, Adam/AdamW get
  ``torch_adam: true`` (DeepSpeed's FusedAdam is a GPU kernel) and ``fused: true``
  (torch's fused CPU kernel steps in place; its default ``foreach`` path holds about two
  fp32 copies of the rank's trainable partition during the step: +3.4 GB at the 2B
  tokenizer's first step on one rank, measured);
- ``grad_clip`` (the training config's, when given) replaces ``gradient_clipping``
  (``0`` = off; RecBole's SASRec trains without clipping).

Parameter groups (:func:`megarec.engine.param_groups.param_groups`) go to
:func:`build_engine` as ``model_parameters``; a group's ``lr_scale`` becomes its ``lr``
(ds config lr x scale) and the schedule multiplies every group's own base lr.

The LR schedule is :class:`WarmupCosine` (linear warmup, cosine decay), given to
DeepSpeed as its client scheduler so its state travels in DeepSpeed checkpoints.
Written here rather than taken from DeepSpeed's ``WarmupCosineLR`` because that one
runs the first two optimizer steps at LR 0 (and the first one even without
warmup). A ds config that has its own ``scheduler`` section keeps it instead.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch

from megarec.config import ConfigError

# Used when no --deepspeed file is given: one process or plain data parallel, fp32 on CPU.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999], "eps": 1e-8,
                                              "weight_decay": "auto"}},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def device() -> torch.device:
    """This rank's device (``cpu`` or ``cuda:<local rank>``, from DeepSpeed's accelerator)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", 0))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the same seed on every rank gives the same
    initial weights; entry points add ``1000 * rank`` afterwards for per-rank dropout streams)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_cpu_threads(threads: int) -> None:
    """On CPU, split the cores among the node's ranks (``threads`` 0 = cores / local ranks, unless
    ``OMP_NUM_THREADS`` is set): torch's default (every core per rank) oversubscribes them under
    ``deepspeed --num_gpus N``, and OpenMP threads that wait for each other run many times slower."""
    if accelerator_name() != "cpu" or (threads == 0 and "OMP_NUM_THREADS" in os.environ):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads or max(1, cores // local))


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the launcher's process group, or start a 1-rank group when run without a launcher.

    ``timeout_s``: the collective timeout of the process group (``None`` = DeepSpeed's default). A long one
    (the tokenizer's ``train.dist_timeout_s``) lets a rank wait out a slow start or a long catalogue export
    of the others. A group that already exists keeps its own timeout."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if timeout_s is None:
        deepspeed.init_distributed(verbose=False)
    else:
        if timeout_s <= 0:
            raise ConfigError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=float(timeout_s)))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _unlink_shm_buffers()
        from megarec.engine.memory_model import fix_mmap_threshold

        fix_mmap_threshold()   # host memory is the rank's device memory: large frees go back to the OS


def _unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank has
    mapped them.

    On the CPU accelerator DeepSpeed's ``shm_initialize`` creates one 69 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and maps every
    rank's buffer before ``init_distributed`` returns, but never unlinks them: each run (and each
    killed one) leaves them behind until ``/dev/shm`` fills memory (measured here: 275 files, 18 GB,
    then the OOM killer). After a barrier every rank has its mappings, which outlive the names.
    """
    import torch.distributed as dist

    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except OSError:
        pass   # no shm buffer (ranks on several nodes, or the op was not built)


def load_ds_config(source: str | Path | dict | None) -> dict[str, Any]:
    """Read a ds config (path or dict; ``None`` -> :data:`DEFAULT_DS_CONFIG`)."""
    if source is None or source == "":
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return cfg


def _fill(section: dict, key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def resolve_ds_config(source: str | Path | dict | None, *, micro_batch_size: int, lr: float,
                      weight_decay: float, accelerator: str | None = None,
                      grad_clip: float | None = None) -> dict[str, Any]:
    """A ds config with every ``"auto"`` filled (see the module docstring).

    ``grad_clip``: ``None`` keeps the file's ``gradient_clipping``; a number replaces it
    (``0`` = no clipping, DeepSpeed's own meaning of 0).
    """
    cfg = load_ds_config(source)
    if grad_clip is not None:
        if grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 = off), got {grad_clip}")
        cfg["gradient_clipping"] = float(grad_clip)
    acc = accelerator or accelerator_name()
    _fill(cfg, "train_micro_batch_size_per_gpu", int(micro_batch_size))
    _fill(cfg, "gradient_accumulation_steps", 1)
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]
    for half in ("bf16", "fp16"):
        sec = cfg.get(half)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            if half == "bf16":
                from deepspeed.accelerator import get_accelerator

                sec["enabled"] = acc != "cpu" and bool(get_accelerator().is_bf16_supported())
            else:
                sec["enabled"] = False
    zero = cfg.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(lr))
        _fill(params, "weight_decay", float(weight_decay))
        if acc == "cpu" and not offload and opt.get("type", "").lower() in ("adam", "adamw"):
            params.setdefault("torch_adam", True)
            if params["torch_adam"] and not params.get("foreach"):
                params.setdefault("fused", True)
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise ConfigError(f"DeepSpeed config: no value for {', '.join(left)} (\"auto\" is only filled for the "
                          "batch size, optimizer lr / weight_decay and bf16.enabled)")
    return cfg


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warmup ``(step + 1) / warmup_steps``,
    then cosine from 1 to ``min_ratio`` at ``total_steps`` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """:func:`warmup_cosine` as a ``LambdaLR`` factor; a plain object so its settings are
    saved with the scheduler state in checkpoints."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio)


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def gate_factor(name: str, gates: dict[str, float]) -> float:
    """The product of the gates whose key is ``name`` or a prefix of it (1 when none)."""
    factor = 1.0
    for key, value in gates.items():
        if name.startswith(key):
            factor *= float(value)
    return factor


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], schedule: WarmupCosine | None = None,
                 model_parameters: list[dict[str, Any]] | None = None, gates: dict[str, float] | None = None,
                 part_steps: dict[str, int] | None = None):
    """``deepspeed.initialize`` with the optimizer of a resolved ds config and ``schedule``.

    ``model_parameters``: optimizer groups (:func:`megarec.engine.param_groups.param_groups`);
    ``None`` = one group of every trainable parameter (the ds config's weight decay on all).
    A group's ``lr_scale`` sets its ``lr`` to ds config lr x scale (an explicit ``lr`` wins).
    Our schedule is a ``LambdaLR``, which multiplies each group's own base lr, so the ratios
    between groups hold at every step. A ds config with its own ``scheduler`` must be
    ``WarmupCosineLR`` when the groups' lrs differ (DeepSpeed's WarmupLR / WarmupDecayLR /
    OneCycle set one lr for every group). ``gates``: live LR multipliers by group name or
    name prefix (:func:`gate_factor`), read at every step. ``part_steps``: group name prefix ->
    the number of steps that part trains (its gate > 0): such a part has a schedule of its own,
    ``schedule``'s warmup and minimum over its own steps, advancing only in steps it trains
    (:class:`PartClocks`, ``engine.lr_clocks``; the trainer saves it in checkpoints).

    Returns the engine (``engine.module`` is the model; ``engine.optimizer`` and
    ``engine.lr_scheduler`` are DeepSpeed's / ours).
    """
    import deepspeed

    init_distributed()
    if model_parameters is None:
        params: list = [p for p in model.parameters() if p.requires_grad]
    else:
        params = _resolve_group_lrs(model_parameters, ds_config)
    use_ours = schedule is not None and "scheduler" not in ds_config
    clocks = PartClocks(schedule, part_steps or {}, gates if gates is not None else {}) if use_ours else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config, dist_init_required=False,
        lr_scheduler=clocks.scheduler if use_ours else None)
    engine.lr_clocks = clocks
    from megarec.engine.checkpoint import link_fp32_masters
    from megarec.engine.memory_model import release_free_heap

    release_free_heap()   # the copies deepspeed.initialize flattened and freed

    link_fp32_masters(engine.optimizer)   # bf16 at ZeRO 0: export the fp32 masters, not bf16 copies
    return engine


class PartClocks:
    """The ``LambdaLR`` factors of our schedule: for each group ``schedule(step) x gate_factor(name)``, or,
    for a group of a part with its own length (``part_steps``: name prefix -> steps), the warmup-cosine
    over that part's own steps, its clock advancing only in steps where its gate is > 0.

    ``gates`` is shared with the method, which may change it between steps (joint methods freeze the
    tokenizer or the recommender for whole epochs with a gate of 0: AdamW would otherwise keep moving
    parameters whose gradient is zero through its momentum and weight decay). The factors are closures,
    so ``LambdaLR.state_dict`` does not save them and a resumed run keeps the live ``gates`` (the method
    derives them from the epoch again); the clocks are saved by the trainer (:meth:`state_dict`).
    """

    def __init__(self, schedule: WarmupCosine, part_steps: dict[str, int], gates: dict[str, float]) -> None:
        self.schedule, self.part_steps, self.gates = schedule, dict(part_steps), gates
        self.counts = {k: 0 for k in self.part_steps}   # steps each part has trained
        self.last_step = 0                              # the scheduler step the counts are at

    def _part(self, name: str) -> str | None:
        hits = [k for k in self.part_steps if name.startswith(k)]
        return max(hits, key=len) if hits else None

    def _advance(self, step: int) -> None:
        """Count the steps since the last call (the gates of the step just taken: a scheduler step comes
        right after its optimizer step)."""
        while self.last_step < step:
            for k in self.counts:
                if gate_factor(k, self.gates) > 0:
                    self.counts[k] += 1
            self.last_step += 1

    def factor(self, name: str, step: int) -> float:
        self._advance(step)
        part, s = self._part(name), self.schedule
        base = s(step) if part is None else warmup_cosine(self.counts[part], s.warmup_steps,
                                                          self.part_steps[part], s.min_ratio)
        return base * gate_factor(name, self.gates)

    def scheduler(self, optimizer):
        names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step, n=n: self.factor(n, step) for n in names])

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.update(state["counts"])
        self.last_step = int(state["last_step"])


def _resolve_group_lrs(groups: list[dict[str, Any]], ds_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of ``groups`` with ``lr`` = ds config lr x ``lr_scale`` where no ``lr`` is given."""
    base = (ds_config.get("optimizer") or {}).get("params", {}).get("lr")
    out = []
    for g in groups:
        g = dict(g)
        scale = g.get("lr_scale", 1.0)
        if "lr" not in g and scale != 1.0:
            if not isinstance(base, (int, float)):
                raise ConfigError("parameter groups with lr_scale need a numeric optimizer.params.lr in the "
                                  "DeepSpeed config")
            g["lr"] = float(base) * float(scale)
        out.append(g)
    lrs = {g.get("lr", base) for g in out}
    sched = (ds_config.get("scheduler") or {}).get("type")
    if len(lrs) > 1 and sched is not None and sched != "WarmupCosineLR":
        raise ConfigError(f"DeepSpeed scheduler {sched} gives every parameter group the same lr; the groups' "
                          f"lrs differ ({sorted(lrs)}): drop the ds config's scheduler or use WarmupCosineLR")
    return out


def refresh_lr(engine) -> None:
    """Re-apply our ``LambdaLR`` factors for the current step now (after a change of the gates:
    ``LambdaLR`` sets the lr of a step at the end of the step before, with the old gates)."""
    sched = getattr(engine, "lr_scheduler", None)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def part_lrs(engine) -> dict[str, float]:
    """The learning rate of each lr part of :func:`megarec.engine.param_groups.param_groups`: ``lr`` for the
    default part (the first group's, as :func:`current_lr`), ``lr_<prefix>`` for a part with its own prefix
    (``lr_tokenizer`` for ``tokenizer.``), gates included (a frozen side shows 0). Groups without a name
    (a plain parameter list) count as the default part."""
    out = {"lr": current_lr(engine)}
    for group in engine.optimizer.param_groups:
        prefix = str(group.get("name", "")).removesuffix("no_decay").removesuffix("decay").rstrip("._")
        if prefix:
            out.setdefault(f"lr_{prefix}", float(group["lr"]))
    return out


def check_run_files(deepspeed: str, init_from: str) -> None:
    """The files a training run reads besides its data, checked before any work: ``train.deepspeed``
    (readable JSON) and ``train.init_from`` (weights that exist); empty = not used."""
    from megarec.data.domain import DataError
    from megarec.engine.checkpoint import resolve_weights

    try:
        load_ds_config(deepspeed or None)
    except ConfigError as e:
        raise ConfigError(f"train.deepspeed: {e}") from e
    if init_from:
        try:
            resolve_weights(init_from)
        except DataError as e:
            raise DataError(f"train.init_from: {e}") from e
