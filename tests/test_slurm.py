"""slurm/ on a real two-node SLURM cluster started for these tests (tests/slurm_cluster.py).

- ``sbatch -N 2 slurm/train_rec.sh`` trains a tiny SASRec on 2 CPU ranks, one per node, to the end:
  checkpoint (one RNG file per rank), ``metrics.json``, TensorBoard events, the per-job log with
  rank-prefixed lines and the printed command;
- preemption: a second, identical job is paused after a known step (``MEGAREC_TEST_HANG_AFTER_STEP``)
  and sent ``scancel --signal=USR1 --batch``; it checkpoints that step, requeues itself, the requeued
  run resumes from the checkpoint without any flag, and ends with the weights, step count and
  test metrics of the uninterrupted job (which is the first test's job: both run side by side);
- SIGTERM (``scancel``, the time limit): a third job checkpoints the current step and is not requeued;
- the rank layout with GPUs (count-only fake GPUs: 2 nodes x 2 = 4 ranks) and its consistency check;
- the requeue bound: an entry point that always "gets preempted" (exits 75) is requeued
  ``MEGAREC_MAX_REQUEUES`` times and then stops;
- the shared-storage check of slurm/_task.sh (a node that does not see the run folder fails with a
  clear message) runs without SLURM;
- ``sbatch -N 2 slurm/pretrain_tokenizer.sh`` trains a tiny UTGRec tokenizer on 2 CPU ranks, and a second,
  preempted job resumes to the same weights (skipped while megarec/train_tokenizer.py does not exist).

The tests that start the cluster are skipped, with the reason, when the Debian packages ``slurm-wlm``
and ``munge`` are not installed (``.ci/run`` installs them) or when not running as root (the daemons
run as root).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist import tb_scalars
from tests.slurm_cluster import SlurmCluster, missing_binaries
from tests.test_train_rec import REPO, write_domain

_missing = missing_binaries()
pytestmark = pytest.mark.slow
# every test that starts the cluster carries this (the others run anywhere)
needs_slurm = pytest.mark.skipif(
    bool(_missing) or os.geteuid() != 0,
    reason=(f"SLURM/munge not installed (apt-get install slurm-wlm munge): no {', '.join(_missing)}" if _missing
            else "the test SLURM cluster runs its daemons as root (CI runs as root)"))

SLURM = REPO / "slurm"
EPOCHS, BATCH, WORLD = 3, 8, 2
# sbatch flags that turn the scripts' GPU defaults into one CPU rank on each of the two nodes
CPU_2NODES = ["-N", "2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=2"]


@pytest.fixture(scope="module")
def cluster():
    # 2 (fake, count-only) GPUs per node for the rank-layout test; the training jobs ask for none
    c = SlurmCluster.start(nodes=2, cpus_per_node=4, gpus_per_node=2)
    try:
        yield c
    finally:
        c.stop()


def _job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitter's environment)."""
    env = {"MEGAREC_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "MEGAREC_LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO)}
    env.update(extra or {})
    return env


def _write_config(root: Path) -> tuple[Path, int]:
    """A tiny SASRec config (every setting in the file: no profile); returns it and steps per epoch."""
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.engine.sampler import batches_per_epoch

    a = write_domain(root, "A", 40, 20, seed=5)
    spe = batches_per_epoch(len(leave_one_out(read_domain(a)).train), BATCH, WORLD)
    cfg = root / "tiny_sasrec.yaml"
    cfg.write_text(json.dumps({   # JSON is YAML
        "method": "sasrec",
        "data": {"paths": [str(a)]},
        "sasrec": {"hidden": 16, "inner": 32, "num_layers": 1},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.01, "warmup_steps": 0, "eval_every": EPOCHS,
                  "log_every": 1, "progress": False, "keep_checkpoints": 2, "eval_batch_size": 64},
    }, indent=1))
    return cfg, spe


@pytest.fixture(scope="module")
def rec_jobs(cluster, tmp_path_factory):
    """Three identical train_rec.sh jobs side by side: ``full`` runs through; ``cut`` is preempted
    (USR1 to the batch script) after step ``hang_at``, requeued and resumed; ``term`` is cancelled
    (SIGTERM to everything, as at the time limit) after the same step."""
    root = tmp_path_factory.mktemp("slurm_rec")
    cfg, spe = _write_config(root)
    hang_at = spe + 2                                  # mid epoch 1, not on a checkpoint of its own
    ids, dirs = {}, {}
    for name in ("full", "cut", "term"):
        env = _job_env() if name == "full" else _job_env({"MEGAREC_TEST_HANG_AFTER_STEP": str(hang_at)})
        ids[name] = cluster.sbatch([*CPU_2NODES, "-J", name, "-o", str(root / f"{name}-%j.out"),
                                    str(SLURM / "train_rec.sh"), str(cfg)], env=env, cwd=root)
        dirs[name] = root / "runs" / f"{name}-{ids[name]}"
    deadline = time.time() + 300
    for name in ("cut", "term"):
        while not (dirs[name] / f"hanging_at_step{hang_at}").exists():
            state = cluster.job(ids[name])["JobState"]
            assert state in ("PENDING", "RUNNING"), f"{name} job {state} before the signal:\n{_log(dirs[name])}"
            assert time.time() < deadline, f"{name} job never reached step {hang_at}:\n{_log(dirs[name])}"
            time.sleep(0.5)
    latest_before = (dirs["cut"] / "checkpoints" / "latest").read_text().strip()
    cluster.run(["scancel", "--signal=USR1", "--batch", str(ids["cut"])])
    cluster.run(["scancel", str(ids["term"])])
    # cut checkpoints, requeues (Restarts=1), runs again and completes
    deadline = time.time() + 300
    while int(cluster.job(ids["cut"]).get("Restarts", "0")) < 1:
        assert cluster.job(ids["cut"])["JobState"] in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"), \
            _log(dirs["cut"])
        assert time.time() < deadline, f"cut job not requeued:\n{_log(dirs['cut'])}"
        time.sleep(0.5)
    # term: checkpoint within KillWait, then the batch script reports and stops (no requeue)
    while "not requeued" not in _log(dirs["term"]):
        assert time.time() < deadline, f"term job did not report:\n{_log(dirs['term'])}"
        time.sleep(0.5)
    full_info = cluster.wait_state(ids["full"], {"COMPLETED"}, timeout=400, log=dirs["full"] / "job.log")
    cut_info = cluster.wait_state(ids["cut"], {"COMPLETED"}, timeout=400, log=dirs["cut"] / "job.log")
    term_info = cluster.wait_state(ids["term"], {"CANCELLED"}, timeout=60, log=dirs["term"] / "job.log")
    return {"root": root, **dirs, "spe": spe, "hang_at": hang_at, "latest_before": latest_before,
            "full_info": full_info, "cut_info": cut_info, "term_info": term_info}


def _log(run_dir: Path) -> str:
    f = run_dir / "job.log"
    return f.read_text()[-6000:] if f.is_file() else f"(no {f})"


# --------------------------------------------------------------------------- train_rec.sh
@needs_slurm
def test_train_rec_runs_on_two_nodes(rec_jobs):
    run, total = rec_jobs["full"], EPOCHS * rec_jobs["spe"]
    assert rec_jobs["full_info"]["NodeList"] == "n[1-2]" and rec_jobs["full_info"]["Restarts"] == "0"
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == total and m["epochs_run"] == EPOCHS and m["resumed_from_step"] is None
    assert m["test"]["count"] == 40                      # every user once, over both ranks
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{total}"
    files = {p.name for p in (run / "checkpoints" / latest).iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= files     # a checkpoint written by two ranks
    assert (run / "model" / "model.safetensors").is_file()
    assert sorted(tb_scalars(run / "tb", "loss/loss")) == list(range(1, total + 1))
    assert list(run.glob("tb/events.out.tfevents.*"))
    log = (run / "job.log").read_text()
    assert "ranks: 2 nodes x 1 = 2" in log
    assert "+ srun --label" in log and "megarec.train_rec" in log          # the command it runs
    assert "--train.run_dir " + str(run) in log and "--resume" not in log
    lines = log.splitlines()
    assert any(line.startswith("0: ") for line in lines) and any(line.startswith("1: ") for line in lines)
    assert "ranks exited with status 0" in log


@needs_slurm
def test_preempted_job_requeues_and_resumes_exactly(rec_jobs):
    cut, full, hang_at = rec_jobs["cut"], rec_jobs["full"], rec_jobs["hang_at"]
    assert rec_jobs["latest_before"] != f"step{hang_at}"          # the preemption checkpoint is a new one
    assert rec_jobs["cut_info"]["Restarts"] == "1"
    log = (cut / "job.log").read_text()
    assert "batch script got SIGUSR1" in log
    assert f"checkpoint at step {hang_at} saved" in log
    assert "ranks exited with status 75" in log and "requeueing job" in log
    assert f"resuming from {cut}/checkpoints/step{hang_at}" in log              # no flag added by anyone
    assert len((cut / "requeues.log").read_text().splitlines()) == 1
    m_full = json.loads((full / "metrics.json").read_text())
    m_cut = json.loads((cut / "metrics.json").read_text())
    assert m_cut["resumed_from_step"] == hang_at
    assert m_cut["global_step"] == m_full["global_step"] and m_cut["epochs_run"] == m_full["epochs_run"]
    assert m_cut["lr"] == pytest.approx(m_full["lr"], rel=1e-9)
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert m_cut["test"][k] == pytest.approx(m_full["test"][k], abs=1e-9), k
    from safetensors.torch import load_file

    w_full = load_file(str(full / "model" / "model.safetensors"))
    w_cut = load_file(str(cut / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    l_full, l_cut = tb_scalars(full / "tb", "loss/loss"), tb_scalars(cut / "tb", "loss/loss")
    assert sorted(l_cut) == sorted(l_full)
    for s in l_full:
        assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), s


@needs_slurm
def test_sigterm_checkpoints_without_requeue(rec_jobs):
    """scancel (SIGTERM to the batch script and every rank, as at the time limit): the ranks
    checkpoint the current step within KillWait and exit 75; the job is not requeued."""
    run, hang_at = rec_jobs["term"], rec_jobs["hang_at"]
    assert rec_jobs["term_info"]["Restarts"] == "0"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{hang_at}"
    log = (run / "job.log").read_text()
    assert "batch script got SIGTERM" in log and f"checkpoint at step {hang_at} saved" in log
    assert "terminated (time limit or scancel): not requeued" in log and f"MEGAREC_RUN_DIR={run}" in log
    assert not (run / "requeues.log").exists() and not (run / "metrics.json").exists()


# --------------------------------------------------------------------------- rank layout, requeue bound
def _entry_script(root: Path, module: str, code: str) -> Path:
    """An sbatch script built like slurm/train_rec.sh (sources slurm/_launch.sh) whose entry point is
    ``root/<module>.py`` with ``code``, plus an empty ``root/cfg.yaml``."""
    (root / f"{module}.py").write_text(code)
    (root / "cfg.yaml").write_text("{}\n")
    script = root / f"{module}.sh"
    script.write_text("#!/usr/bin/env bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nset -euo pipefail\n"
                      f"ENTRY={module} RUN_DIR_KEY=--run_dir RESUME_FLAG=--resume SLURM_DIR={SLURM}\n"
                      f"source {SLURM}/_launch.sh\n")
    return script


@needs_slurm
def test_one_rank_per_gpu_of_the_allocation(cluster, tmp_path):
    """``sbatch -N 2 --gpus-per-node=2 --ntasks-per-node=2``: 4 ranks, 2 per node with local ranks
    0 and 1, the rendezvous on the first node; GPUs and tasks per node that differ are refused."""
    script = _entry_script(tmp_path, "show_env", "import os, sys\nprint('ENV', *(f'{k}={os.environ.get(k)}' for k in "
                           "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_SIZE', 'NODE_RANK', 'MASTER_ADDR', "
                           "'SLURMD_NODENAME', 'SLURM_CPUS_PER_TASK')), 'ARGS', *sys.argv[1:])\n")
    env = _job_env({"PYTHONPATH": str(tmp_path)})
    job = cluster.sbatch(["-N", "2", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=2", "-J", "gpus", "-o",
                          str(tmp_path / "gpus-%j.out"), str(script), "cfg.yaml", "--train.lr", "0.1"],
                         env=env, cwd=tmp_path)
    run = tmp_path / "runs" / f"gpus-{job}"
    cluster.wait_state(job, {"COMPLETED"}, timeout=120, log=run / "job.log")
    log = (run / "job.log").read_text()
    assert "ranks: 2 nodes x 2 = 4 (one per GPU); rendezvous 127.0.0.1:" in log
    assert "--gpus-per-node=2" in log and "--cpus-per-task=2" in log and "DS_ACCELERATOR" not in log
    ranks = {}
    for line in log.splitlines():
        if " ENV " in line:
            f = dict(kv.split("=", 1) for kv in line.split(" ENV ")[1].split(" ARGS ")[0].split())
            ranks[int(f["RANK"])] = f
            assert line.split(" ARGS ")[1].split() == ["--config", "cfg.yaml", "--train.lr", "0.1", "--run_dir", str(run)]
    assert sorted(ranks) == [0, 1, 2, 3]
    assert {r: (f["WORLD_SIZE"], f["LOCAL_RANK"], f["LOCAL_SIZE"], f["NODE_RANK"], f["SLURMD_NODENAME"])
            for r, f in ranks.items()} == {0: ("4", "0", "2", "0", "n1"), 1: ("4", "1", "2", "0", "n1"),
                                           2: ("4", "0", "2", "1", "n2"), 3: ("4", "1", "2", "1", "n2")}
    assert {f["MASTER_ADDR"] for f in ranks.values()} == {"127.0.0.1"}
    assert {f["SLURM_CPUS_PER_TASK"] for f in ranks.values()} == {"2"}   # data workers get their cores
    bad = cluster.sbatch(["-N", "2", "--gpus-per-node=2", "--ntasks-per-node=1", "-J", "bad", "-o",
                          str(tmp_path / "bad-%j.out"), str(script), "cfg.yaml"], env=env, cwd=tmp_path)
    info = cluster.wait_state(bad, {"FAILED"}, timeout=120)
    assert info["ExitCode"] == "2:0"
    assert "2 GPUs per node but --ntasks-per-node=1" in (tmp_path / "runs" / f"bad-{bad}" / "job.log").read_text()


@needs_slurm
def test_requeue_is_bounded(cluster, tmp_path):
    """An entry point that exits 75 at once (as if preempted every time) is requeued
    ``MEGAREC_MAX_REQUEUES`` times, then the job stops with that status."""
    script = _entry_script(tmp_path, "always_preempted",
                           "import sys\nprint('pretending to be preempted')\nsys.exit(75)\n")
    job = cluster.sbatch(["-N", "2", "-J", "bounded", "-o", str(tmp_path / "bounded-%j.out"), str(script), "cfg.yaml"],
                         env=_job_env({"PYTHONPATH": str(tmp_path), "MEGAREC_MAX_REQUEUES": "2"}), cwd=tmp_path)
    run = tmp_path / "runs" / f"bounded-{job}"
    info = cluster.wait_state(job, {"FAILED"}, timeout=120, log=run / "job.log")
    assert info["Restarts"] == "2" and info["ExitCode"] == "75:0", info
    log = (run / "job.log").read_text()
    assert log.count("pretending to be preempted") == 2 * 3               # 2 ranks, 3 runs
    assert "already requeued 2 times (MEGAREC_MAX_REQUEUES=2)" in log
    assert len((run / "requeues.log").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- preemption guard
def test_preemption_guard_turns_a_signal_into_a_stop():
    """Without the launcher's variable nothing is installed; with it, SIGUSR1 no longer kills the
    process but makes the next check (every ``MEGAREC_PREEMPT_CHECK_EVERY`` steps) say stop."""
    import signal

    from megarec.engine import preemption

    before = signal.getsignal(signal.SIGUSR1)
    old = {k: os.environ.pop(k, None) for k in (preemption.SIGNALS_ENV, preemption.CHECK_EVERY_ENV)}
    try:
        assert preemption.install_from_env() is None and not preemption.should_stop(1)
        os.environ.update({preemption.SIGNALS_ENV: "USR1,TERM", preemption.CHECK_EVERY_ENV: "2"})
        g = preemption.install_from_env()
        assert g is not None and preemption.guard() is g and not preemption.received()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert preemption.received() and g.signame == "USR1"
        assert not preemption.should_stop(3) and preemption.should_stop(4)     # only every 2nd step
        exc = preemption.preempted(4)
        assert isinstance(exc, SystemExit) and exc.code == preemption.EXIT_CODE == 75 and "step 4" in str(exc)
    finally:
        preemption.uninstall()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert signal.getsignal(signal.SIGUSR1) == before and not preemption.should_stop(4)


# --------------------------------------------------------------------------- shared storage
def test_rank_that_cannot_see_the_run_folder_fails_clearly(tmp_path):
    """slurm/_task.sh on a "node" whose run folder lacks the batch script's marker (what a
    node-local disk looks like): a clear error, exit 3, the command never starts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".shared_storage_check").write_text("token-of-another-job\n")
    env = dict(os.environ, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID="1",
               MEGAREC_RUN_DIR=str(run), MEGAREC_SHARED_TOKEN="12.0.n1.42", MEGAREC_BATCH_HOST="n1",
               MEGAREC_SHARED_CHECK_S="1")
    res = subprocess.run([str(SLURM / "_task.sh"), "echo", "started"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 3 and "started" not in res.stdout
    assert "rank 1" in res.stderr and "does not see the run folder" in res.stderr and "shared storage" in res.stderr
    (run / ".shared_storage_check").write_text("12.0.n1.42\n")          # the same folder: the rank starts
    res = subprocess.run([str(SLURM / "_task.sh"), "bash", "-c", "echo $RANK/$WORLD_SIZE/$LOCAL_RANK/$NODE_RANK"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "1/2/0/1", res.stderr


# --------------------------------------------------------------------------- pretrain_tokenizer.sh
@needs_slurm
@pytest.mark.skipif(not (REPO / "megarec" / "train_tokenizer.py").is_file(),
                    reason="megarec/train_tokenizer.py does not exist yet (UTGRec issue); "
                           "slurm/pretrain_tokenizer.sh launches it")
def test_pretrain_tokenizer_runs_and_resumes_on_two_nodes(cluster, tmp_path):
    """``sbatch -N 2 slurm/pretrain_tokenizer.sh CONFIG --key value ...``: the UTGRec tokenizer (tiny
    random Qwen2-VL and VAE, sample shards with placeholder images) on 2 CPU ranks, one per node,
    twice side by side: ``tok`` runs through, ``tokcut`` is preempted after step 3, requeued, resumed,
    and ends with ``tok``'s weights."""
    from safetensors.torch import load_file

    from tests.utgrec_fixtures import tiny_models, tiny_overrides, write_sample_shards

    shards = write_sample_shards(tmp_path)
    qwen, vae = tiny_models(tmp_path)
    steps, hang_at = 6, 3
    cfg = tmp_path / "tiny_tokenizer.yaml"
    cfg.write_text(json.dumps({"data": {"shards": str(shards), "heldout_items": 16},
                               "train": {"batch_size": 4, "max_steps": steps, "log_every": 1, "eval_every": 2,
                                         "save_every_steps": 2, "lr": 3e-3, "progress": False}}, indent=1))
    overrides = [a for k, v in tiny_overrides(qwen, vae) for a in (f"--{k}", v)]   # passed on the command line
    ids, runs = {}, {}
    for name in ("tok", "tokcut"):
        env = _job_env({"MEGAREC_TEST_HANG_AFTER_STEP": str(hang_at)} if name == "tokcut" else None)
        ids[name] = cluster.sbatch([*CPU_2NODES, "-J", name, "-o", str(tmp_path / f"{name}-%j.out"),
                                    str(SLURM / "pretrain_tokenizer.sh"), str(cfg), *overrides], env=env, cwd=tmp_path)
        runs[name] = tmp_path / "runs" / f"{name}-{ids[name]}"
    deadline = time.time() + 300
    while not (runs["tokcut"] / f"hanging_at_step{hang_at}").exists():
        assert cluster.job(ids["tokcut"])["JobState"] in ("PENDING", "RUNNING"), _log(runs["tokcut"])
        assert time.time() < deadline, f"tokcut never reached step {hang_at}:\n{_log(runs['tokcut'])}"
        time.sleep(0.5)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(ids["tokcut"])])
    info = {n: cluster.wait_state(ids[n], {"COMPLETED"}, timeout=400, log=runs[n] / "job.log") for n in ids}
    run = runs["tok"]
    assert info["tok"]["NodeList"] == "n[1-2]" and info["tok"]["Restarts"] == "0"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (run / "checkpoints" / latest).iterdir()}
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == steps and m["resumed_from_step"] is None
    assert (run / "codes.safetensors").is_file() and (run / "model" / "model.safetensors").is_file()
    assert sorted(tb_scalars(run / "tb", "loss/loss")) == list(range(1, steps + 1))
    log = (run / "job.log").read_text()
    assert "ranks: 2 nodes x 1 = 2" in log and "megarec.train_tokenizer" in log and "--utgrec.codebook.dim 8" in log
    assert "ranks exited with status 0" in log
    cut = runs["tokcut"]
    assert info["tokcut"]["Restarts"] == "1"
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == hang_at
    assert f"resuming from {cut}/checkpoints/step{hang_at}" in (cut / "job.log").read_text()
    w_full, w_cut = (load_file(str(r / "model" / "model.safetensors")) for r in (run, cut))
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
