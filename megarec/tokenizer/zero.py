"""Reading and writing whole parameters that DeepSpeed ZeRO may have partitioned.

Codebook initialisation and dead-code restarts change parameters outside
``forward``. Under ZeRO-3 a parameter's ``.data`` is only this rank's shard, and
under any ZeRO stage the optimizer keeps its own fp32 master copy that the next
step would copy back. So a write must (1) gather the parameter
(``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``), (2) update the
fp32 master (``deepspeed.utils.safe_set_full_fp32_param``) and (3) reset the
optimizer moments of the rows it replaced. Callers pass the *same* value on
every rank (broadcast first), so every rank ends with the same parameter.

Without DeepSpeed (one process, or plain DDP) the same calls are plain tensor
copies; DeepSpeed is imported only when a parameter carries its attributes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from megarec.distributed import is_dist

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _has_master(p: torch.nn.Parameter) -> bool:
    # ZeRO-1/2 set ``_hp_mapping`` on every rank (None where another rank owns the
    # whole parameter); the master-copy calls are collectives, so test presence only.
    # A frozen parameter (E in fine-tuning) is in no optimizer group: it is its only copy
    # (ZeRO-3 still links it to the optimizer, whose partition lookup then fails).
    return p.requires_grad and (_is_zero3(p) or hasattr(p, "_hp_mapping"))


@contextmanager
def gathered(params: list[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Make the full ``params`` visible on every rank; with ``modify``, rank 0's edits persist."""
    if any(_is_zero3(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """A detached copy of the whole parameter (gathered under ZeRO-3)."""
    with gathered([p]):
        return p.data.detach().clone()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with ``src``'s value (no-op when not distributed)."""
    if is_dist():
        torch.distributed.broadcast(t, src=src)
    return t


def write_rows(p: torch.nn.Parameter, rows: torch.Tensor | None, values: torch.Tensor,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Set ``p[rows] = values`` (all rows when ``rows`` is None) on every rank, master copy included.

    ``values`` must be identical on every rank. The optimizer moments of the
    written rows are zeroed so stale Adam statistics do not drag the new rows back;
    ``optimizer`` is only needed for a plain torch optimizer (DeepSpeed's is found
    through the parameter).
    """
    with gathered([p], modify=True):
        with torch.no_grad():
            if rows is None:
                p.data.copy_(values.reshape(p.data.shape).to(p.data))
            else:
                p.data[rows] = values.to(p.data)
        full = p.data.detach().clone() if _has_master(p) else None
    if full is not None:
        _write_master(p, rows, full)
    elif optimizer is not None:
        state = optimizer.state.get(p, {})
        for key in _MOMENTS:
            if key in state and state[key].shape == p.shape:
                if rows is None:
                    state[key].zero_()
                else:
                    state[key][rows] = 0


def _write_master(p: torch.nn.Parameter, rows: torch.Tensor | None, full: torch.Tensor) -> None:
    if _is_zero3(p):
        _write_zero3_master(p, rows, full)
        return
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state

    safe_set_full_fp32_param(p, full.float())
    for key in _MOMENTS:
        # ZeRO-1/2 set ``_hp_mapping = None`` where another rank owns the whole parameter and
        # the full-state read is a collective, so every rank must agree that the moments exist.
        m = p._hp_mapping
        local = m is None or (m.optim_fragment is not None and key in m.optim_fragment)
        flag = torch.tensor([int(local)], device=p.device)
        if is_dist():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if not flag.item():  # no step taken yet
            continue
        state = safe_get_full_optimizer_state(p, key)
        if rows is None:
            state.zero_()
        else:
            state[rows] = 0
        safe_set_full_optimizer_state(p, state, key)


def _write_zero3_master(p: torch.nn.Parameter, rows: torch.Tensor | None, full: torch.Tensor) -> None:
    """Copy this rank's slice of ``full`` into the ZeRO-3 fp32 master and zero the moments of ``rows``.

    Local (no collectives). Written against ZeRO-3's partition accessors because
    ``safe_set_full_fp32_param`` reads past the end of ``full`` when the parameter's
    size is not a multiple of the world size (the last partition is padded).
    NVMe-swapped optimizer states are not handled.
    """
    opt = getattr(p, "_z3_optimizer", None)
    if opt is None:  # partitioned by zero.Init, no engine yet: the parameter is the only copy
        return
    written = torch.zeros(p.ds_shape, dtype=torch.bool)
    written[slice(None) if rows is None else rows.cpu()] = True
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
    start, n = part.numel() * opt._get_param_partition_rank(p), part.numel()
    value = full.flatten()[start:start + n].to(part)
    part.data[: value.numel()].copy_(value)
    mask = written.flatten()[start:start + n].to(part.device)
    state = opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[group], {})
    for key in _MOMENTS:
        if key in state:  # present once the optimizer has stepped
            moment, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
            moment.data[: mask.numel()][mask] = 0
