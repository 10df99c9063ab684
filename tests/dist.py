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


# --------------------------------------------------------------------------- whole 2-rank jobs
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def zero3_config(path) -> str:
    """``ds_configs/zero3.json`` with even tiny tensors partitioned, written to ``path``."""
    import json

    z3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path.write_text(json.dumps(z3))
    return str(path)


def launch(entry: str, args: list[str], log, env_extra: dict[str, str] | None = None, cli: bool = False):
    """``deepspeed --num_gpus 2 megarec/<entry>.py ARGS`` on CPU ranks (own master port, own process
    group); with ``cli`` the same through ``megarec train-rec --launcher deepspeed``."""
    import shutil
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MEGAREC_LOG_LEVEL="WARNING",
               **(env_extra or {}))
    port = ["--master_port", str(_free_port())]
    if cli:
        cmd = [sys.executable, "-m", "megarec.cli", "train-rec", "--launcher", "deepspeed", "--num_gpus", "2", *port,
               *args]
    else:
        exe = shutil.which("deepspeed")
        launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd = [*launcher, "--num_gpus", "2", *port, str(REPO / "megarec" / f"{entry}.py"), *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=str(REPO))


def wait_ok(proc, log, timeout: float = 400) -> None:
    """Wait for a launched job; fail with the end of its log if it times out or exits non-zero."""
    import signal
    import subprocess

    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run timed out; log:\n{log.read_text()[-4000:]}")
    assert rc == 0, f"exit {rc}; log:\n{log.read_text()[-4000:]}"


def last_checkpoint_before(step: int, save_every: int, steps_per_epoch: int) -> int:
    """The last step <= ``step`` that the trainer checkpoints: every ``save_every`` steps and at each epoch end."""
    return max(s for s in range(1, step + 1) if s % save_every == 0 or s % steps_per_epoch == 0)


def full_and_resumed_runs(root, entry: str, common: list[str], hang_at: int, resume_cli: bool = False) -> dict:
    """The exact-resume experiment every distributed trainer test runs: an uninterrupted job
    (``root/full``) and, side by side, the same job SIGKILLed right after step ``hang_at``
    (the trainers' ``MEGAREC_TEST_HANG_AFTER_STEP`` hook) and resumed with ``--resume``
    (``root/cut``). Returns the run folders, the checkpoint tag at the kill and its files."""
    import signal
    import time

    from megarec.engine.trainer import HANG_ENV

    full, cut = root / "full", root / "cut"
    p_full = launch(entry, [*common, "--train.run_dir", str(full)], root / "full.log")
    p_cut = launch(entry, [*common, "--train.run_dir", str(cut)], root / "cut.log", {HANG_ENV: str(hang_at)})
    marker = cut / f"hanging_at_step{hang_at}"
    deadline = time.time() + 400
    while not marker.exists():
        assert p_cut.poll() is None, f"run ended before the kill:\n{(root / 'cut.log').read_text()[-4000:]}"
        assert time.time() < deadline, "run never reached the hang step"
        time.sleep(0.2)
    os.killpg(p_cut.pid, signal.SIGKILL)
    p_cut.wait(timeout=60)
    latest = (cut / "checkpoints" / "latest").read_text().strip()
    killed_files = sorted(p.name for p in (cut / "checkpoints" / latest).iterdir())
    p_resume = launch(entry, [*common, "--train.run_dir", str(cut), "--resume"], root / "resume.log", cli=resume_cli)
    wait_ok(p_full, root / "full.log")
    wait_ok(p_resume, root / "resume.log")
    return {"full": full, "cut": cut, "latest_at_kill": latest, "killed_files": killed_files}


def tb_scalars(folder, tag: str) -> dict[int, float]:
    """``step -> value`` of one TensorBoard scalar in the event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def joint_method_runs(root, method: str, method_args: list[str], epochs: int, hang_at_epoch: int,
                      eval_every: int, batch: int = 8, save_every: int = 2) -> dict:
    """:func:`full_and_resumed_runs` of a joint method (ETEGRec, UniGRec) under ``train_rec.py`` on 2 ranks
    with ZeRO-3, profile tiny: killed 3 steps into epoch ``hang_at_epoch`` (one step past a checkpoint),
    resumed through the CLI. ``method_args``: the method's inputs (domain, tokenizer, teacher ...).
    Returns the runs plus ``spe`` (steps per epoch) and ``last_ckpt`` (the step the resume starts at)."""
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.engine.sampler import batches_per_epoch

    domain = method_args[method_args.index("--data.paths") + 1]
    spe = batches_per_epoch(len(leave_one_out(read_domain(domain)).train), batch, 2)
    hang_at = hang_at_epoch * spe + 3
    common = ["--deepspeed", zero3_config(root / "z3.json"), "--profile", "tiny", "--method", method, *method_args,
              "--train.epochs", str(epochs), "--train.batch_size", str(batch), "--train.lr", "0.01",
              "--train.eval_every", str(eval_every), "--train.save_every_steps", str(save_every),
              "--train.log_every", "1", "--train.progress", "false", "--train.keep_checkpoints", "2"]
    out = full_and_resumed_runs(root, "train_rec", common, hang_at, resume_cli=True)
    return {**out, "spe": spe, "last_ckpt": last_checkpoint_before(hang_at, save_every, spe)}


def assert_resumed_to_the_same_state(runs: dict, loss_tags: tuple[str, ...]) -> None:
    """The resumed run of :func:`joint_method_runs` ends where the uninterrupted one does: same steps,
    test metrics, validation history, exported weights and codes, last checkpoint (tokenizer included)
    and every logged value of ``loss_tags``."""
    import json

    import pytest
    import torch
    from safetensors.torch import load_file

    from megarec.engine.checkpoint import read_weights

    full = json.loads((runs["full"] / "metrics.json").read_text())
    cut = json.loads((runs["cut"] / "metrics.json").read_text())
    assert runs["latest_at_kill"] == f"step{runs['last_ckpt']}"
    assert cut["resumed_from_step"] == runs["last_ckpt"] and cut["global_step"] == full["global_step"]
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert cut["test"][k] == pytest.approx(full["test"][k], abs=1e-9), k
    assert [h["ndcg@10"] for h in cut["valid_history"]] == pytest.approx([h["ndcg@10"] for h in full["valid_history"]])
    w_full = load_file(str(runs["full"] / "model" / "model.safetensors"))
    w_cut = load_file(str(runs["cut"] / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys() and torch.equal(w_full["item_codes"], w_cut["item_codes"])
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    c_full, _ = read_weights(runs["full"] / "checkpoints")      # the last epoch end, past the kill
    c_cut, _ = read_weights(runs["cut"] / "checkpoints")
    assert c_full.keys() == c_cut.keys() and "tokenizer.quantizer.codebook_0" in c_full
    for k in c_full:
        torch.testing.assert_close(c_cut[k], c_full[k], rtol=1e-5, atol=1e-6, msg=k)
    for tag in loss_tags:
        l_full, l_cut = tb_scalars(runs["full"] / "tb", tag), tb_scalars(runs["cut"] / "tb", tag)
        assert sorted(l_cut) == sorted(l_full), tag
        for s in l_full:
            assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), (tag, s)
