"""Where the training loop's batches come from, resumably.

A :class:`BatchSource` cuts training into sections: :class:`EpochBatches` gives one section per
epoch (per-rank batches of sample indices from :mod:`.sampler`, resumable by (epoch, batch));
:class:`StreamBatches` gives one section for the whole run (an iterator over a loader with
``state_dict()/load_state_dict()``, e.g. :class:`~megarec.data.shard_reader.ShardLoader`,
resumable by the loader state). A section's ``items`` yield micro-batches; its ``total`` and
``done`` count optimizer steps (``accumulation`` micro-batches each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

from megarec.distributed import get_rank, get_world_size
from megarec.engine.sampler import epoch_batches, grouped_epoch_batches


@dataclass
class Section:
    """A stretch of training: an epoch, or the whole of a stream."""

    index: int                # epoch number (0 for a stream)
    items: Iterator[Any]      # the micro-batches left in the section, in order
    total: int                # optimizer steps in the section
    done: int                 # of which already done (a resumed run)
    desc: str = "train"       # progress-bar label
    leave: bool = True        # keep the progress bar when the section ends


class BatchSource(Protocol):
    """What the loop reads batches from; its state goes into every checkpoint."""

    accumulation: int

    def section(self, global_step: int) -> Section | None:
        """The section at the current position; ``None`` when training is complete."""

    def end_section(self) -> None:
        """Move past the current section (called after its last step, before its checkpoint)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EpochBatches:
    """``epochs`` epochs over ``num_samples`` training samples, each a list of this rank's batches of
    sample indices (length-grouped when ``lengths`` is given). With gradient accumulation an epoch
    ends on an optimizer step: its last ``len % accumulation`` batches are dropped."""

    def __init__(self, num_samples: int, batch_size: int, epochs: int, seed: int = 0,
                 lengths: np.ndarray | None = None, group_window: int = 50, accumulation: int = 1) -> None:
        self.num_samples, self.batch_size, self.epochs, self.seed = num_samples, batch_size, epochs, seed
        self.lengths, self.group_window, self.accumulation = lengths, group_window, accumulation
        self.rank, self.world = get_rank(), get_world_size()
        self.epoch = self.batch = 0   # position: next epoch, next batch inside it

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.lengths is not None:
            b = grouped_epoch_batches(self.lengths, self.batch_size, epoch, self.seed, self.rank, self.world,
                                      self.group_window)
        else:
            b = epoch_batches(self.num_samples, self.batch_size, epoch, self.seed, self.rank, self.world)
        return b[:len(b) - len(b) % self.accumulation]

    def section(self, global_step: int) -> Section | None:
        if self.epoch >= self.epochs:
            return None
        b, a = self.batches(self.epoch), self.accumulation
        return Section(self.epoch, self._items(b), len(b) // a, self.batch // a, f"epoch {self.epoch}", leave=False)

    def _items(self, batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        for i in range(self.batch, len(batches)):
            self.batch = i + 1          # the position once this batch is trained on
            yield batches[i]

    def end_section(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __repr__(self) -> str:
        return f"epoch {self.epoch}, batch {self.batch}"


class StreamBatches:
    """``total_steps`` optimizer steps from ``loader``, passing over it as often as needed (each pass
    one loader epoch). Its position is the loader's own ``state_dict()``."""

    def __init__(self, loader: Any, total_steps: int, accumulation: int = 1, desc: str = "train") -> None:
        self.loader, self.total, self.accumulation, self.desc = loader, total_steps, accumulation, desc

    def section(self, global_step: int) -> Section | None:
        if global_step >= self.total:
            return None
        return Section(0, self._items(), self.total, global_step, self.desc)

    def _items(self) -> Iterator[Any]:
        empty = 0
        while True:
            n = 0
            for item in self.loader:
                n += 1
                yield item
            empty = empty + 1 if n == 0 else 0
            if empty > 1:   # one empty pass is a resume at the end of a loader epoch
                raise RuntimeError("the training loader yields no batches")

    def end_section(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __repr__(self) -> str:
        return ", ".join(f"loader {k} {v}" for k, v in self.loader.state_dict().items() if isinstance(v, int))
