"""Run a function on N CPU ranks (gloo) for tests of distributed code.

    from tests.dist import run_ranks
    results = run_ranks(my_fn, world_size=2, args=(x,))   # my_fn(rank, world, *args) -> picklable

``my_fn`` must be importable at module level (it is pickled into spawned processes).
Each rank's return value comes back in rank order; an exception in any rank fails the call.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        # plain pickle copies tensor data: multiprocessing's reducer would pass shared-memory
        # handles that die with this process
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report every failure, including assertion errors
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 300) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        rank, ok, out = queue.get(timeout=timeout)
        (results.__setitem__(rank, pickle.loads(out)) if ok else errors.append(f"rank {rank}:\n{out}"))
    for p in procs:
        p.join(timeout=30)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
