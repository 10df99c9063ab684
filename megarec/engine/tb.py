"""TensorBoard scalars under stable tags (rank 0 writes; other ranks no-op).

Tags: ``loss/<name>``; validation ``eval/recall@k`` and ``eval/ndcg@k`` (plus
``eval/<domain>/...`` per domain when several are evaluated); the final test pass
``test/recall@k``, ``test/ndcg@k``; ``perf/samples_per_s``, ``perf/memory_gb``, ``perf/data_wait_frac``,
``perf/step_s``, ``perf/mfu`` / ``hfu`` / ``tflops`` (with a known peak); ``train/lr``.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Mapping

from megarec.distributed import is_main_process


class TBLogger:
    """``SummaryWriter`` on rank 0. On resume pass the restored step as ``purge_step``
    so that events a killed run wrote after its last checkpoint are dropped."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        self.writer = None
        if is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def memory_gb() -> float:
    """Peak accelerator memory of this rank, or peak resident memory of the process on CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
