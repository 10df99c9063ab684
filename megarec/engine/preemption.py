"""Preemption: turn a signal into "checkpoint at the next step boundary, then exit 75".

A cluster warns a job before taking its nodes away: ``slurm/_launch.sh`` asks SLURM for
``SIGUSR1`` some seconds ahead (``#SBATCH --signal=B:USR1@<s>``) and forwards it to every
rank; at the time limit or on ``scancel`` every rank gets ``SIGTERM``. The launcher exports
``MEGAREC_PREEMPT_SIGNALS=USR1,TERM``; an entry point calls :func:`install_from_env` first
thing, which replaces the default action of those signals (terminate at once) by setting a
flag. The training loop calls :func:`should_stop` after each optimizer step; it is a
collective (ranks get the signal at different moments, so they agree on the step with a
MAX all-reduce of the flag), run every ``MEGAREC_PREEMPT_CHECK_EVERY`` steps (default 1:
one 4-byte all-reduce per step). The flag is a CPU tensor reduced on a gloo group
(:func:`megarec.distributed.cpu_group`): a host round trip that never waits for the GPU's
queue (under nccl a device flag read back with ``.item()`` would drain it every step). When it says stop, the loop writes a checkpoint and raises
:class:`Preempted`, a ``SystemExit`` with :data:`EXIT_CODE` (75, ``EX_TEMPFAIL``): the
launcher requeues the job on that code and the next run resumes from the checkpoint.

Without ``MEGAREC_PREEMPT_SIGNALS`` nothing is installed and :func:`should_stop` is a
constant ``False``: no signal handler, no collective.
"""
from __future__ import annotations

import os
import signal
from typing import Sequence

EXIT_CODE = 75                       # EX_TEMPFAIL: "try again later"; the launcher requeues on it
SIGNALS_ENV = "MEGAREC_PREEMPT_SIGNALS"
CHECK_EVERY_ENV = "MEGAREC_PREEMPT_CHECK_EVERY"


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with :data:`EXIT_CODE`
    unless someone catches it."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(EXIT_CODE)
        self.step, self.signame = step, signame

    def __str__(self) -> str:
        return f"preempted by SIG{self.signame}: checkpoint at step {self.step} written, exiting {EXIT_CODE}"


class PreemptionGuard:
    """Signal handlers that record the last preemption signal; :meth:`should_stop` is the collective check."""

    def __init__(self, signals: Sequence[str], check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"{CHECK_EVERY_ENV} must be >= 1, got {check_every}")
        self.check_every = int(check_every)
        self.signals = [_signum(s) for s in signals]
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handler) for s in self.signals}

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.received = signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.received).name.removeprefix("SIG") if self.received else ""

    def should_stop(self, step: int) -> bool:
        """Collective every ``check_every`` steps: ``True`` on every rank when any rank got a signal."""
        if step % self.check_every:
            return False
        flag = 1 if self.received is not None else 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            from megarec.distributed import cpu_group

            group = cpu_group()   # gloo: a host round trip, the accelerator's queue is never drained
            if group is not None:
                t = torch.tensor([flag], dtype=torch.int32)
            else:
                from megarec.engine.deepspeed_setup import device

                t = torch.tensor([flag], dtype=torch.int32, device=device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = int(t.tolist()[0])
            if flag and self.received is None:     # another rank got it first
                self.received = int(signal.SIGUSR1)
        return bool(flag)

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for s, h in self._previous.items():
            signal.signal(s, h)


_GUARD: PreemptionGuard | None = None


def _signum(name: str) -> int:
    name = name.strip().upper()
    try:
        return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))
    except AttributeError:
        raise ValueError(f"{SIGNALS_ENV}: unknown signal {name!r}") from None


def install(signals: Sequence[str], check_every: int = 1) -> PreemptionGuard:
    """Install (or replace) the process's guard; call it from the main thread, early."""
    global _GUARD
    if _GUARD is not None:
        _GUARD.uninstall()
    _GUARD = PreemptionGuard(signals, check_every)
    return _GUARD


def install_from_env() -> PreemptionGuard | None:
    """Install a guard when ``MEGAREC_PREEMPT_SIGNALS`` (e.g. ``USR1,TERM``) is set; else do nothing."""
    names = [s for s in os.environ.get(SIGNALS_ENV, "").split(",") if s.strip()]
    if not names:
        return None
    return install(names, int(os.environ.get(CHECK_EVERY_ENV, "1") or 1))


def uninstall() -> None:
    """Remove the process's guard (tests; a long-lived process that trains twice)."""
    global _GUARD
    if _GUARD is not None:
        _GUARD.uninstall()
    _GUARD = None


def guard() -> PreemptionGuard | None:
    return _GUARD


def received() -> bool:
    """Whether this rank got a preemption signal (local, no collective)."""
    return _GUARD is not None and _GUARD.received is not None


def should_stop(step: int) -> bool:
    """The training loop's check after optimizer step ``step``: a collective when a guard is
    installed (every rank must call it at the same steps), ``False`` otherwise."""
    return _GUARD is not None and _GUARD.should_stop(step)


def preempted(step: int) -> Preempted:
    """The exception to raise once the checkpoint of ``step`` is on disk."""
    return Preempted(step, _GUARD.signame if _GUARD is not None else "")
