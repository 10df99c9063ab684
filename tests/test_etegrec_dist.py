"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: a tiny ETEGRec trains (tokenizer,
recommender, tokenizer epochs; every rank runs the tokenizer every step and regenerates codes),
evaluates, and a second run SIGKILLed in the middle of a tokenizer epoch resumes from its
checkpoint to exactly the state of the uninterrupted run (weights, codes, losses, metrics).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_etegrec import make_inputs
from tests.dist import full_and_resumed_runs, last_checkpoint_before, zero3_config
from tests.test_train_rec_dist import _scalars

pytestmark = pytest.mark.slow

EPOCHS, BATCH, SAVE_EVERY = 3, 8, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megarec.data.readers import read_domain
    from megarec.data.splits import leave_one_out
    from megarec.engine.sampler import batches_per_epoch

    root = tmp_path_factory.mktemp("etegrec_dist")
    inp = make_inputs(root)
    spe = batches_per_epoch(len(leave_one_out(read_domain(inp["domain"])).train), BATCH, 2)
    hang_at = 2 * spe + 3                       # mid epoch 2 (a tokenizer epoch), one step past a checkpoint
    last_ckpt = last_checkpoint_before(hang_at, SAVE_EVERY, spe)
    common = ["--deepspeed", zero3_config(root / "z3.json"), "--profile", "tiny", "--method", "etegrec",
              "--data.paths", str(inp["domain"]), "--etegrec.embeddings", str(inp["emb"]),
              "--etegrec.tokenizer", str(inp["tok"]), "--train.epochs", str(EPOCHS),
              "--train.batch_size", str(BATCH), "--train.lr", "0.01", "--train.eval_every", "2",
              "--train.save_every_steps", str(SAVE_EVERY), "--train.log_every", "1", "--train.progress", "false",
              "--train.keep_checkpoints", "2"]
    out = full_and_resumed_runs(root, "train_rec", common, hang_at, resume_cli=True)
    return {**out, "spe": spe, "last_ckpt": last_ckpt, "root": root}


def test_zero3_two_ranks_train_and_regenerate_codes(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    assert m["global_step"] == EPOCHS * runs["spe"] and m["epochs_run"] == EPOCHS
    assert m["test"]["count"] == 40 and len(m["valid_history"]) == 2
    for tag in ("loss/rec", "loss/sq", "loss/sia", "loss/psa"):
        assert len(_scalars(runs["full"], tag)) == EPOCHS * runs["spe"], tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["full"] / "tb" / "codebook"))
    acc.Reload()
    change = {e.step: e.value for e in acc.Scalars("codebook/change_rate")}
    assert sorted(change) == [runs["spe"], 3 * runs["spe"]]          # after epochs 0 and 2


def test_killed_tokenizer_epoch_resumes_to_the_same_state(runs):
    from safetensors.torch import load_file

    assert runs["latest_at_kill"] == f"step{runs['last_ckpt']}" and runs["last_ckpt"] > 2 * runs["spe"]
    full = json.loads((runs["full"] / "metrics.json").read_text())
    cut = json.loads((runs["cut"] / "metrics.json").read_text())
    assert cut["resumed_from_step"] == runs["last_ckpt"] and cut["global_step"] == full["global_step"]
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert cut["test"][k] == pytest.approx(full["test"][k], abs=1e-9), k
    w_full = load_file(str(runs["full"] / "model" / "model.safetensors"))
    w_cut = load_file(str(runs["cut"] / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys() and "item_codes" in w_full
    assert torch.equal(w_full["item_codes"], w_cut["item_codes"])
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    from megarec.engine.checkpoint import read_weights

    c_full, _ = read_weights(runs["full"] / "checkpoints")      # the last epoch end, past the kill
    c_cut, _ = read_weights(runs["cut"] / "checkpoints")
    assert c_full.keys() == c_cut.keys() and "tokenizer.quantizer.codebook_0" in c_full
    for k in c_full:
        torch.testing.assert_close(c_cut[k], c_full[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [h["ndcg@10"] for h in cut["valid_history"]] == pytest.approx([h["ndcg@10"] for h in full["valid_history"]])
    for tag in ("loss/loss", "loss/sia", "loss/psa", "loss/sq"):
        l_full, l_cut = _scalars(runs["full"], tag), _scalars(runs["cut"], tag)
        assert sorted(l_cut) == sorted(l_full), tag
        for s in l_full:
            assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), (tag, s)
