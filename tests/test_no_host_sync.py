"""No host syncs in a training step (issue 19, item 4), and the ``perf/*`` scalars of item 5.

A host sync (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``, ``bincount``,
a boolean-mask index) drains the GPU queue. On CPU nothing is asynchronous, so the test counts the
*calls*: :class:`SyncCounter` patches them on ``torch.Tensor`` / ``torch`` and counts each one whose
caller is MegaRec code running inside the loop's step (``TrainLoop._section``) but outside the places
that are allowed to read values: the logging window, checkpoints, evaluation, the data preparation
(host tensors before the copy), the host-side collectives on gloo (``gather_sizes``, the preemption
flag) and one-off work (the k-means initialisation). A tiny UTGRec tokenizer run and a tiny TIGER run
(1 CPU rank) must show none; an InfoNCE over 2 ranks must issue one host size gather and no device
size gathers. ``megarec/engine/loop.py``'s docstring lists the syncs that remain.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks, tb_scalars

# Functions whose frames may read device values: the window, checkpoints, evaluation, data preparation,
# host collectives (gloo), one-off initialisation.
ALLOWED = {"_log_window", "_save", "_pause", "evaluate_step", "on_section_end", "_hang", "_preempt", "prepare",
           "gather_sizes", "should_stop", "init_from_data", "window_scalars", "window_state", "_validate"}
_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")
_FUNCS = ("nonzero", "bincount", "unique", "masked_select")


class SyncCounter:
    """Counts host-sync calls made by MegaRec code inside a training step (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._saved: list[tuple[object, str, object]] = []

    def _where(self) -> str | None:
        caller = sys._getframe(2)
        if "/megarec/" not in caller.f_code.co_filename.replace("\\", "/"):
            return None
        f, in_step = caller, False
        while f is not None:
            name = f.f_code.co_name
            if name in ALLOWED or (name == "__next__" and f.f_code.co_filename.endswith("dataloader.py")):
                return None   # allowed frames; under the DataLoader: data production (workers in real runs)
            if name == "_section" and f.f_code.co_filename.endswith("loop.py"):
                in_step = True
            f = f.f_back
        if not in_step:
            return None
        return f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} ({caller.f_code.co_name})"

    def _wrap(self, owner, name: str) -> None:
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            where = self._where()
            if where is not None:
                self.calls[f"{name} at {where}"] += 1
            return orig(*args, **kwargs)

        self._saved.append((owner, name, orig))
        setattr(owner, name, counted)

    def __enter__(self) -> "SyncCounter":
        for m in _METHODS:
            self._wrap(torch.Tensor, m)
        for f in _FUNCS:
            self._wrap(torch, f)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)


# --------------------------------------------------------------------------- UTGRec tokenizer
@pytest.fixture(scope="module")
def utgrec_run(tmp_path_factory):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig
    from megarec.methods.utgrec.tokenizer_run import run
    from tests.utgrec_fixtures import tiny_models, tiny_overrides, write_sample_shards

    root = tmp_path_factory.mktemp("nosync_utgrec")
    qwen, vae = tiny_models(root)
    o = tiny_overrides(qwen, vae) + [
        ("data.shards", str(write_sample_shards(root))), ("train.batch_size", "4"), ("train.max_steps", "6"),
        ("utgrec.loss.warmup_steps", "2"), ("train.run_dir", str(root / "run")), ("train.log_every", "3"),
        ("train.eval_every", "1000"), ("train.save_every_steps", "1000"), ("data.heldout_items", "0"),
        ("train.progress", "false"), ("train.peak_tflops", "1.0"), ("export.codes", "false")]
    with SyncCounter() as sc:
        run(load_config(TrainTokenizerConfig, None, o))
    return root / "run", sc.calls


def test_utgrec_tokenizer_step_has_no_host_sync(utgrec_run):
    _, calls = utgrec_run
    assert not calls, f"host syncs inside the UTGRec tokenizer's step: {dict(calls)}"


def test_utgrec_logs_mfu_and_time_split(utgrec_run):
    run_dir, _ = utgrec_run
    for tag in ("perf/mfu", "perf/hfu", "perf/tflops", "perf/data_wait_frac", "perf/step_s", "perf/samples_per_s"):
        got = tb_scalars(run_dir / "tb", tag)
        assert sorted(got) == [3, 6], (tag, got)
    for v in tb_scalars(run_dir / "tb", "perf/mfu").values():
        assert 0.0 < v < 1.0
    for v in tb_scalars(run_dir / "tb", "perf/data_wait_frac").values():
        assert 0.0 < v < 1.0


# --------------------------------------------------------------------------- TIGER (the recommender's step)
def test_tiger_step_has_no_host_sync_and_logs_perf(tmp_path):
    from megarec.train_rec import main
    from tests.test_train_rec import TINY, write_codes, write_domain

    a = write_domain(tmp_path, "A", 40, 20, seed=1)
    codes = write_codes(tmp_path / "codes.safetensors", [("A", 20)], [3, 3, 4])
    run = tmp_path / "run"
    with SyncCounter() as sc:
        rc = main([*TINY, "--method", "tiger", "--data.paths", str(a), "--data.codes", str(codes),
                   "--train.run_dir", str(run), "--train.epochs", "2", "--train.batch_size", "8",
                   "--train.log_every", "2", "--train.peak_tflops", "0.5"])
    assert rc == 0
    assert not sc.calls, f"host syncs inside the recommender's step: {dict(sc.calls)}"
    mfu = tb_scalars(run / "tb", "perf/mfu")
    assert mfu and all(0.0 < v < 1.0 for v in mfu.values())
    assert tb_scalars(run / "tb", "perf/data_wait_frac")


def test_no_mfu_on_cpu_without_a_peak(tmp_path):
    from megarec.engine.flops import peak_flops

    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12


# --------------------------------------------------------------------------- InfoNCE on 2 ranks
def _infonce_collectives(rank: int, world: int):
    import torch.distributed as dist

    from megarec.methods.utgrec.tokenizer import alignment_loss

    seen = Counter()
    orig = dist.all_gather

    def counted(out, t, *a, **k):
        seen["sizes" if t.dtype == torch.long else "rows"] += 1
        return orig(out, t, *a, **k)

    dist.all_gather = counted
    try:
        torch.manual_seed(rank)
        h = torch.randn(4, 3, 8, requires_grad=True)
        with SyncCounterOutsideLoop() as sc:
            loss = alignment_loss(h, torch.randn(4, 3, 8), 0.1)
            loss.backward()
    finally:
        dist.all_gather = orig
    return dict(seen), dict(sc.calls), float(loss)


class SyncCounterOutsideLoop(SyncCounter):
    """Every MegaRec host-sync call, wherever it is (except the host size gather)."""

    def _where(self) -> str | None:
        caller = sys._getframe(2)
        if "/megarec/" not in caller.f_code.co_filename.replace("\\", "/"):
            return None
        f = caller
        while f is not None:
            if f.f_code.co_name == "gather_sizes":
                return None
            f = f.f_back
        return f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} ({caller.f_code.co_name})"


def test_infonce_over_two_ranks_gathers_sizes_once_on_the_host():
    out = run_ranks(_infonce_collectives, 2)
    for seen, calls, _ in out:
        assert seen == {"sizes": 1, "rows": 3}, seen    # was 6 device gathers (3 of them sizes) + .item() each
        assert not calls, calls


# --------------------------------------------------------------------------- preemption flag on 2 ranks
def _preemption_flag(rank: int, world: int):
    import signal

    import torch.distributed as dist

    from megarec.engine import preemption

    guard = preemption.install(["USR1"])
    reduced = []
    orig = dist.all_reduce

    def counted(t, *a, **k):
        reduced.append(t.device.type)
        return orig(t, *a, **k)

    dist.all_reduce = counted
    try:
        first = preemption.should_stop(1)
        if rank == 1:
            guard.received = int(signal.SIGUSR1)
        second = preemption.should_stop(2)
    finally:
        dist.all_reduce = orig
        preemption.uninstall()
    return first, second, reduced


def test_preemption_flag_is_a_host_collective():
    """Any rank's signal stops every rank at the same step; the flag is a CPU tensor (gloo), never read back
    from the accelerator."""
    for first, second, reduced in run_ranks(_preemption_flag, 2):
        assert (first, second) == (False, True) and reduced == ["cpu", "cpu"]
