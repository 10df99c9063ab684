"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: train_rec.py trains a tiny TIGER, a
second run is SIGKILLed mid-epoch, resumed from its checkpoint, and must end exactly where
the uninterrupted run ends (weights, step count, LR, loss curve, test metrics).

The two runs go side by side (each on its own master port) to overlap their start-up; the
resumed one goes through ``megarec train-rec --launcher deepspeed``.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.dist import full_and_resumed_runs, last_checkpoint_before, tb_scalars, zero3_config
from tests.test_train_rec import write_codes, write_domain

pytestmark = pytest.mark.slow

# LOG_EVERY does not divide SAVE_EVERY: the checkpoint the killed run resumes from lies inside a
# logging window, which must average the same steps as in the uninterrupted run.
EPOCHS, BATCH, WORLD, SAVE_EVERY, LOG_EVERY = 3, 8, 2, 3, 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    a = write_domain(root, "A", 40, 20, seed=5)
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.engine.sampler import batches_per_epoch

    spe = batches_per_epoch(len(leave_one_out(read_domain(a)).train), BATCH, WORLD)
    hang_at = spe + 5                                  # mid epoch 1, a few steps past a checkpoint
    last_ckpt = last_checkpoint_before(hang_at, SAVE_EVERY, spe)
    codes = write_codes(root / "codes.safetensors", [("A", 20)], [5, 4])
    common = ["--deepspeed", zero3_config(root / "z3.json"), "--profile", "tiny", "--method", "tiger",
              "--data.paths", str(a), "--data.codes", str(codes), "--train.epochs", str(EPOCHS),
              "--train.batch_size", str(BATCH), "--train.lr", "0.01", "--train.eval_every", str(EPOCHS),
              "--train.save_every_steps", str(SAVE_EVERY), "--train.log_every", str(LOG_EVERY), "--train.progress", "false",
              "--train.keep_checkpoints", "2"]
    out = full_and_resumed_runs(root, "train_rec", common, hang_at, resume_cli=True)   # resumed through the CLI
    return {**out, "spe": spe, "hang_at": hang_at, "last_ckpt": last_ckpt}


def test_zero3_two_ranks_train(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    total = EPOCHS * runs["spe"]
    assert m["global_step"] == total and m["epochs_run"] == EPOCHS
    assert m["test"]["count"] == 40                      # every user once, over both ranks
    loss = tb_scalars(runs["full"] / "tb", "loss/loss")
    # a window closes every LOG_EVERY steps and at each epoch end
    spe = runs["spe"]
    assert sorted(loss) == sorted(set(range(LOG_EVERY, total + 1, LOG_EVERY)) | {spe * e for e in range(1, EPOCHS + 1)})
    steps = sorted(loss)
    first, last = (loss[steps[0]] + loss[steps[1]]) / 2, (loss[steps[-1]] + loss[steps[-2]]) / 2
    assert last < 0.7 * first, (first, last)
    # a real ZeRO-3 checkpoint: one optimizer partition per rank
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_rank0.pt", "rng_rank1.pt"} <= set(runs["killed_files"])


def test_killed_run_resumes_to_the_same_state(runs):
    assert runs["hang_at"] > runs["last_ckpt"] > runs["spe"]         # killed mid-epoch, past its checkpoint
    assert runs["latest_at_kill"] == f"step{runs['last_ckpt']}"
    full = json.loads((runs["full"] / "metrics.json").read_text())
    cut = json.loads((runs["cut"] / "metrics.json").read_text())
    assert full["resumed_from_step"] is None and cut["resumed_from_step"] == runs["last_ckpt"]
    assert cut["global_step"] == full["global_step"] and cut["epochs_run"] == full["epochs_run"]
    assert cut["lr"] == pytest.approx(full["lr"], rel=1e-9)
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert cut["test"][k] == pytest.approx(full["test"][k], abs=1e-9), k
    from safetensors.torch import load_file

    w_full = load_file(str(runs["full"] / "model" / "model.safetensors"))
    w_cut = load_file(str(runs["cut"] / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    # the loss curve (killed run up to its checkpoint + resumed run) is the uninterrupted one,
    # window by window (the window open at the checkpoint was saved with it)
    assert runs["last_ckpt"] % LOG_EVERY and runs["last_ckpt"] % runs["spe"]
    l_full, l_cut = tb_scalars(runs["full"] / "tb", "loss/loss"), tb_scalars(runs["cut"] / "tb", "loss/loss")
    assert sorted(l_cut) == sorted(l_full)
    for s in l_full:
        assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), s
    lr_full, lr_cut = tb_scalars(runs["full"] / "tb", "train/lr"), tb_scalars(runs["cut"] / "tb", "train/lr")
    assert all(lr_cut[s] == pytest.approx(lr_full[s], rel=1e-6) for s in lr_full)


def test_init_from_reads_a_zero3_checkpoint(runs):
    """``--init_from`` accepts a DeepSpeed ZeRO-3 checkpoint folder: the partitions of both ranks are
    consolidated (zero_to_fp32) into the same weights as the exported model of that epoch."""
    from safetensors.torch import load_file

    from megarec.engine.checkpoint import read_weights

    exported = load_file(str(runs["full"] / "model" / "model.safetensors"))
    state, _ = read_weights(runs["full"] / "checkpoints")       # latest = the last epoch end
    assert set(state) == set(exported)             # tied embeddings included: loadable with --init_from
    for k, v in state.items():
        torch.testing.assert_close(v.float(), exported[k], rtol=0, atol=0, msg=k)
