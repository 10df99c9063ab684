"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: a tiny UniGRec trains (every rank runs
the soft tokenizer every step, codes are regenerated at the start of every later epoch), evaluates, and a second
run SIGKILLed mid-epoch resumes from its checkpoint to exactly the state of the uninterrupted run
(weights, codes, losses, metrics).
"""
from __future__ import annotations

import json

import pytest

from tests.dist import assert_resumed_to_the_same_state, joint_method_runs, tb_scalars
from tests.test_unigrec import make_inputs

pytestmark = pytest.mark.slow

EPOCHS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unigrec_dist")
    inp = make_inputs(root)
    return joint_method_runs(root, "unigrec", ["--data.paths", str(inp["domain"]), "--unigrec.tokenizer",
                                               str(inp["tok"]), "--unigrec.teacher", str(inp["teacher"])],
                             EPOCHS, hang_at_epoch=1, eval_every=1)


def test_zero3_two_ranks_train_evaluate_and_regenerate_codes(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    assert m["global_step"] == EPOCHS * runs["spe"] and m["epochs_run"] == EPOCHS
    assert m["test"]["count"] == 40 and len(m["valid_history"]) == EPOCHS
    for tag in ("loss/rec", "loss/recon", "loss/cd_t", "loss/cd_r"):
        vals = tb_scalars(runs["full"] / "tb", tag)
        assert len(vals) == EPOCHS * runs["spe"] and all(v == v for v in vals.values()), tag
    change = tb_scalars(runs["full"] / "tb" / "codebook", "codebook/change_rate")
    assert sorted(change) == [0, runs["spe"]]          # the initial codes, then at the start of epoch 1


def test_killed_run_resumes_to_the_same_state(runs):
    assert runs["last_ckpt"] > runs["spe"]
    assert_resumed_to_the_same_state(runs, ("loss/loss", "loss/rec", "loss/cd_t", "loss/cd_r"))
