"""DeepSpeed checkpoints with exact resume, and safetensors weights in and out.

A checkpoint is DeepSpeed's own (module, optimizer partitions, LR scheduler) plus
``client_state["trainer"]`` (epoch, position inside the epoch, global step,
early-stopping state) and one ``rng_rank<r>.pt`` per rank (torch CPU and
accelerator, numpy and Python RNG states: tensors and plain values only, read
back with ``weights_only=True``). ``latest`` is replaced atomically only after
every rank has finished writing the tag (DeepSpeed's own ``latest`` is written by
rank 0 without waiting for the others), so a run killed at any moment resumes
from a complete checkpoint.

Weights for users (``model.safetensors``) are gathered to rank 0 first when
parameters are ZeRO-3 partitioned, and loaded back through
``GatheredParameters`` so that the same call works at every ZeRO stage.
Under bf16 (or fp16) the module's parameters are low-precision copies; the
exported weights are the optimizer's fp32 master weights instead
(:func:`fp32_master`): DeepSpeed's ``safe_get_full_fp32_param`` at ZeRO 1/2/3,
and at ZeRO 0 the master tensors of DeepSpeed's ``FP16_Optimizer`` /
``FP16_UnfusedOptimizer`` (its bf16 path at stage 0), which
:func:`link_fp32_masters` attaches to each parameter when the engine is built.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megarec.data.domain import DataError
from megarec.distributed import barrier, get_rank, get_world_size, is_main_process

MODEL_FILE = "model.safetensors"


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as tensors and plain values."""
    from deepspeed.accelerator import get_accelerator

    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


# --------------------------------------------------------------------------- checkpoints
def _tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    out = []
    for p in ckpt_dir.glob("step*"):
        m = re.fullmatch(r"step(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def save_checkpoint(engine, ckpt_dir: str | Path, trainer_state: dict[str, Any], keep: int = 2) -> str:
    """Collective: every rank calls it. Writes tag ``step<global_step>``, keeps the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{int(trainer_state['global_step'])}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{get_rank()}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
    barrier()  # every rank's files are complete before ``latest`` names the tag
    if is_main_process():
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")  # atomic
    if is_main_process() and keep > 0:
        for _, old in _tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def latest_tag(ckpt_dir: str | Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict[str, Any] | None:
    """Restore module, optimizer, scheduler and RNG from the latest checkpoint; its trainer state, or ``None``."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise DataError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{get_rank()}.pt"
    if not rng_file.is_file():
        raise DataError(f"{rng_file} is missing: the checkpoint was written by a run with a different number of "
                        f"ranks (now {get_world_size()}); exact resume needs the same world size")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return client["trainer"]


# --------------------------------------------------------------------------- safetensors weights
def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASTER_ATTR = "_megarec_fp32_master"


def link_fp32_masters(optimizer: Any) -> int:
    """Attach to each low-precision parameter a getter of its fp32 master copy, for DeepSpeed's
    ZeRO-0 mixed-precision optimizers (``FP16_Optimizer``: one flat fp32 tensor per group, the
    parameters in group order; ``FP16_UnfusedOptimizer``: one fp32 tensor per parameter).
    Other optimizers are left alone (ZeRO 1/2/3 link their own). Returns how many were linked.

    Getters, not tensors: they read the optimizer's current master tensors at export time.
    """
    linked = 0
    flat = getattr(optimizer, "fp32_groups_flat", None)
    per_param = getattr(optimizer, "fp32_groups", None)
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None or (flat is None and per_param is None):
        return 0
    for i, group in enumerate(groups):
        offset = 0
        for j, p in enumerate(group):
            if p.dtype in _LOW_PRECISION:
                if flat is not None:
                    getter = (lambda i=i, o=offset, p=p:
                              optimizer.fp32_groups_flat[i].narrow(0, o, p.numel()).view(p.shape))
                else:
                    getter = (lambda i=i, j=j: optimizer.fp32_groups[i][j])
                setattr(p, _MASTER_ATTR, getter)
                linked += 1
            offset += p.numel()
    return linked


def fp32_master(p: torch.Tensor) -> torch.Tensor | None:
    """The full fp32 master copy of a low-precision trainable parameter, or ``None`` when ``p`` is
    its own master (fp32 training, frozen parameters, buffers).

    Collective at ZeRO 1/2/3 (DeepSpeed all-reduces the fragments): every rank must ask for
    the same parameters in the same order.
    """
    if not isinstance(p, torch.nn.Parameter) or p.dtype not in _LOW_PRECISION or not p.requires_grad:
        return None
    getter = getattr(p, _MASTER_ATTR, None)
    if getter is not None:
        return getter()
    if (_is_partitioned(p) and hasattr(p, "_z3_optimizer")) or (not _is_partitioned(p) and hasattr(p, "_hp_mapping")):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return None


def gather_state_dict(module: torch.nn.Module, names: Any = None) -> dict[str, torch.Tensor]:
    """Full fp32 CPU state dict on rank 0 (``{}`` elsewhere); collective under ZeRO.

    Low-precision parameters are exported from their fp32 master copies (:func:`fp32_master`),
    not as upcast bf16 values. Parameters are gathered one at a time, so peak memory is one
    full parameter on top of each rank's partition. ``names``: only these entries (the same on
    every rank; ``None`` = all).
    """
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    main = is_main_process()
    keep = None if names is None else set(names)
    for name, t in module.state_dict(keep_vars=True).items():
        if keep is not None and name not in keep:
            continue
        master = fp32_master(t)
        if master is not None:
            if main:
                out[name] = master.detach().float().cpu().clone()
        elif _is_partitioned(t):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if main:
                    out[name] = t.detach().float().cpu().clone()
        elif main:
            out[name] = t.detach().cpu().clone() if not t.is_floating_point() else t.detach().float().cpu().clone()
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` as one safetensors file, atomically (a run killed mid-write never leaves a truncated
    model). Not a collective: call it on the rank that holds ``state``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata or {})
    tmp.replace(path)


def export_safetensors(module: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Collective: gather the full weights and write them (rank 0) as one safetensors file."""
    state = gather_state_dict(module)
    if is_main_process():
        save_safetensors(state, path, metadata)
    barrier()


def resolve_weights(source: str | Path) -> Path:
    """A safetensors file, a folder holding ``model.safetensors`` (or ``model/model.safetensors``,
    a run folder), or a DeepSpeed checkpoint folder (has ``latest``)."""
    p = Path(source)
    for cand in (p, p / MODEL_FILE, p / "model" / MODEL_FILE):
        if cand.is_file():
            return cand
    if (p / "latest").is_file() or (p / "checkpoints" / "latest").is_file():
        return p if (p / "latest").is_file() else p / "checkpoints"
    raise DataError(f"{source}: no {MODEL_FILE}, run folder or DeepSpeed checkpoint there")


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` from anything :func:`resolve_weights` accepts.

    DeepSpeed checkpoints go through ``zero_to_fp32`` (any ZeRO stage >= 1), which
    consolidates the fp32 master weights of every rank's partition.
    """
    p = resolve_weights(source)
    if p.is_file():
        try:
            with safe_open(str(p), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except Exception as e:
            raise DataError(f"{p}: not a safetensors file ({e})") from e
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(p))), {}
    except Exception as e:  # stage-0 checkpoints and foreign folders
        raise DataError(f"{p}: cannot read weights from this DeepSpeed checkpoint ({e}); "
                        f"use the run's exported model/{MODEL_FILE} instead") from e


def load_state_dict_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "weights",
                         keys: Any = None) -> None:
    """Copy a full state dict into ``module`` (plain or ZeRO-3 partitioned); clear error on a mismatch.
    ``keys``: load only these entries of the module (the rest stay as built; ``state`` must hold them all and
    nothing the module lacks); ``None`` = every entry."""
    import deepspeed

    own = module.state_dict(keep_vars=True)
    if keys is not None:
        wanted = set(keys)
        own = {k: v for k, v in own.items() if k in wanted}
        extra = [k for k in state if k not in module.state_dict(keep_vars=True)]
    else:
        extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if missing or extra:
        raise DataError(f"{source} do not fit this model: missing {missing[:5]}, unexpected {extra[:5]} "
                        f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, t in own.items():
        src = state[name]
        shape = tuple(t.ds_shape) if _is_partitioned(t) else tuple(t.shape)
        if tuple(src.shape) != shape:
            raise DataError(f"{source}: {name} has shape {tuple(src.shape)}, the model expects {shape}")
        if _is_partitioned(t):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                if is_main_process():
                    with torch.no_grad():
                        t.data.copy_(src.to(t.dtype))
        else:
            with torch.no_grad():
                t.data.copy_(src.to(device=t.device, dtype=t.dtype))
    barrier()


def write_json(path: str | Path, obj: Any) -> None:
    if is_main_process():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2))
