"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: a tiny ETEGRec trains (tokenizer,
recommender, tokenizer epochs; every rank runs the tokenizer every step and regenerates codes),
evaluates, and a second run SIGKILLed in the middle of a tokenizer epoch resumes from its
checkpoint to exactly the state of the uninterrupted run (weights, codes, losses, metrics).
"""
from __future__ import annotations

import json

import pytest

from tests.dist import assert_resumed_to_the_same_state, joint_method_runs, tb_scalars
from tests.test_etegrec import make_inputs

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("etegrec_dist")
    inp = make_inputs(root)
    return joint_method_runs(root, "etegrec", ["--data.paths", str(inp["domain"]), "--etegrec.embeddings",
                                               str(inp["emb"]), "--etegrec.tokenizer", str(inp["tok"])],
                             EPOCHS, hang_at_epoch=2, eval_every=2)   # epoch 2 is a tokenizer epoch


def test_zero3_two_ranks_train_and_regenerate_codes(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    assert m["global_step"] == EPOCHS * runs["spe"] and m["epochs_run"] == EPOCHS
    assert m["test"]["count"] == 40 and len(m["valid_history"]) == 2
    for tag in ("loss/rec", "loss/sq", "loss/sia", "loss/psa"):
        assert len(tb_scalars(runs["full"] / "tb", tag)) == EPOCHS * runs["spe"], tag
    change = tb_scalars(runs["full"] / "tb" / "codebook", "codebook/change_rate")
    # at the start of epoch 1, after tokenizer epoch 0 (none after the last epoch: it is evaluated on its codes)
    assert sorted(change) == [runs["spe"]]


def test_killed_tokenizer_epoch_resumes_to_the_same_state(runs):
    assert runs["last_ckpt"] > 2 * runs["spe"]                        # inside the tokenizer epoch
    assert_resumed_to_the_same_state(runs, ("loss/loss", "loss/sia", "loss/psa", "loss/sq"))
