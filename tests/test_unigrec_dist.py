"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: a tiny UniGRec trains (every rank runs
the soft tokenizer every step, codes are regenerated after every epoch), evaluates, and a second
run SIGKILLed mid-epoch resumes from its checkpoint to exactly the state of the uninterrupted run
(weights, codes, losses, metrics).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.dist import full_and_resumed_runs, last_checkpoint_before, zero3_config
from tests.test_train_rec_dist import _scalars
from tests.test_unigrec import _scalars as scalars_in, make_inputs

pytestmark = pytest.mark.slow

EPOCHS, BATCH, SAVE_EVERY = 2, 8, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.engine.sampler import batches_per_epoch

    root = tmp_path_factory.mktemp("unigrec_dist")
    inp = make_inputs(root)
    spe = batches_per_epoch(len(leave_one_out(read_domain(inp["domain"])).train), BATCH, 2)
    hang_at = spe + 3                           # mid epoch 1, one step past a checkpoint
    last_ckpt = last_checkpoint_before(hang_at, SAVE_EVERY, spe)
    common = ["--deepspeed", zero3_config(root / "z3.json"), "--profile", "tiny", "--method", "unigrec",
              "--data.paths", str(inp["domain"]), "--unigrec.tokenizer", str(inp["tok"]),
              "--unigrec.teacher", str(inp["teacher"]), "--train.epochs", str(EPOCHS),
              "--train.batch_size", str(BATCH), "--train.lr", "0.01", "--train.eval_every", "1",
              "--train.save_every_steps", str(SAVE_EVERY), "--train.log_every", "1", "--train.progress", "false",
              "--train.keep_checkpoints", "2"]
    out = full_and_resumed_runs(root, "train_rec", common, hang_at, resume_cli=True)
    return {**out, "spe": spe, "last_ckpt": last_ckpt}


def test_zero3_two_ranks_train_evaluate_and_regenerate_codes(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    assert m["global_step"] == EPOCHS * runs["spe"] and m["epochs_run"] == EPOCHS
    assert m["test"]["count"] == 40 and len(m["valid_history"]) == EPOCHS
    for tag in ("loss/rec", "loss/recon", "loss/cd_t", "loss/cd_r"):
        vals = _scalars(runs["full"], tag)
        assert len(vals) == EPOCHS * runs["spe"] and all(v == v for v in vals.values()), tag
    change = scalars_in(runs["full"] / "tb" / "codebook", "codebook/change_rate")
    assert sorted(change) == [0, runs["spe"], 2 * runs["spe"]]          # initial codes, after each epoch


def test_killed_run_resumes_to_the_same_state(runs):
    from safetensors.torch import load_file

    from megarec.engine.checkpoint import read_weights

    assert runs["latest_at_kill"] == f"step{runs['last_ckpt']}" and runs["last_ckpt"] > runs["spe"]
    full = json.loads((runs["full"] / "metrics.json").read_text())
    cut = json.loads((runs["cut"] / "metrics.json").read_text())
    assert cut["resumed_from_step"] == runs["last_ckpt"] and cut["global_step"] == full["global_step"]
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert cut["test"][k] == pytest.approx(full["test"][k], abs=1e-9), k
    w_full = load_file(str(runs["full"] / "model" / "model.safetensors"))
    w_cut = load_file(str(runs["cut"] / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys() and torch.equal(w_full["item_codes"], w_cut["item_codes"])
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    c_full, _ = read_weights(runs["full"] / "checkpoints")
    c_cut, _ = read_weights(runs["cut"] / "checkpoints")
    assert c_full.keys() == c_cut.keys() and "tokenizer.quantizer.codebook_0" in c_full
    for k in c_full:
        torch.testing.assert_close(c_cut[k], c_full[k], rtol=1e-5, atol=1e-6, msg=k)
    for tag in ("loss/loss", "loss/rec", "loss/cd_t", "loss/cd_r"):
        l_full, l_cut = _scalars(runs["full"], tag), _scalars(runs["cut"], tag)
        assert sorted(l_cut) == sorted(l_full), tag
        for s in l_full:
            assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), (tag, s)
