"""Collectives and rank-aware logging.

Everything here works with or without an initialised process group, so the
same code runs in a single CPU process, under ``deepspeed --num_gpus 2`` on
CPU (gloo) and on GPUs (nccl).
"""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


_CPU_GROUP: list = []   # [default group, its gloo group] once made: a gloo group for host-side collectives of small host values


def cpu_group():
    """A process group on which CPU tensors can be reduced (gloo): the default group when it is gloo,
    else a gloo group over every rank, made on first use (a collective: every rank must reach its first
    use at the same point, as the callers here do: the loss and the loop run on every rank).

    Host values (batch sizes, a preemption flag) go through it so that agreeing on them never touches
    the accelerator's queue: a CPU collective costs a network round trip but does not wait for the
    GPU. ``None`` when gloo is unavailable (callers then use the default group and a device tensor)."""
    if not is_dist():
        return None
    world = dist.group.WORLD
    if not _CPU_GROUP or _CPU_GROUP[0] is not world:   # made for another (destroyed) default group
        _CPU_GROUP.clear()
        if dist.get_backend() == "gloo":
            group = world
        else:
            group = dist.new_group(backend="gloo") if dist.is_gloo_available() else None
        _CPU_GROUP.extend([world, group])
    return _CPU_GROUP[1]


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its local batch size), in rank order; ``[n]`` when not distributed.

    A CPU all-gather on :func:`cpu_group` (no accelerator sync); without gloo, an all-gather of a
    ``device`` tensor (a CUDA device under nccl) read back once.
    """
    if not is_dist():
        return [int(n)]
    group = cpu_group()
    dev = "cpu" if group is not None else device
    size = torch.tensor([int(n)], device=dev, dtype=torch.long)
    sizes = torch.zeros(dist.get_world_size(), device=dev, dtype=torch.long)
    dist.all_gather(list(sizes.chunk(dist.get_world_size())), size, group=group)
    return sizes.tolist()   # one read (a host copy when gloo: no device sync)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward routes each rank's slice of the
    summed gradient back to that rank (the open_clip / SimCLR pattern).

    Every rank's loss may use every rank's rows, so the gradient w.r.t. rank s's
    rows is the sum over ranks of their losses' gradients: backward all-reduces
    (sums) the gathered gradient and returns this rank's slice. After DDP /
    DeepSpeed average the parameter gradients, they are the gradients of the
    mean over ranks of the per-rank losses (``megarec.kernels.infonce`` scales
    its loss so that this mean is the single-process loss on the concatenated
    batch). Ranks may hold different batch sizes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        counts = list(sizes) if sizes is not None else gather_sizes(x.shape[0], x.device)
        if counts[dist.get_rank()] != x.shape[0]:
            raise ValueError(f"all_gather_with_grad: sizes say {counts[dist.get_rank()]} rows on this rank, "
                             f"x has {x.shape[0]}")
        max_n = max(counts)
        padded = x
        if max_n != x.shape[0]:
            padded = x.new_zeros((max_n,) + tuple(x.shape[1:]))
            padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bufs, padded.contiguous())
        ctx.counts = counts
        ctx.rank = dist.get_rank()
        if all(n == max_n for n in counts):
            return torch.cat(bufs, dim=0)
        return torch.cat([b[:n] for b, n in zip(bufs, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably. ``sizes``: every rank's row count
    when the caller has them (:func:`gather_sizes`, once for several gathers); else they are gathered here."""
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, sizes)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks (in place when distributed) and return it."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (trusted, in-job only)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return True


def get_logger(name: str = "megarec") -> logging.Logger:
    """Logger that tags lines with the rank; INFO on rank 0, WARNING elsewhere."""
    logger = logging.getLogger(name)
    if not getattr(logger, "_megarec_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[%(asctime)s rank%(rank)s %(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        logger._megarec_configured = True  # type: ignore[attr-defined]
    level = os.environ.get("MEGAREC_LOG_LEVEL", "INFO" if is_main_process() else "WARNING")
    logger.setLevel(level)
    return logger
