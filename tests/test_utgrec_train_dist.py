"""``deepspeed --num_gpus 2`` on CPU (gloo) with ZeRO-3: train_tokenizer.py trains the UTGRec tokenizer
(tiny random Qwen2-VL loaded with ``from_pretrained``, tiny AutoencoderKL, shards where 1 item in 6
has a placeholder image, so one rank's batch often has images while the other's has none), a second run is SIGKILLed after its checkpoint, resumed, and must end exactly where the
uninterrupted run ends (weights, loss curve, exported codes)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.dist import full_and_resumed_runs, tb_scalars, zero3_config
from tests.utgrec_fixtures import tiny_models, tiny_overrides, write_sample_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, HANG_AT, LOG_EVERY = 8, 3, 5, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("utgrec_dist")
    shards = write_sample_shards(root, image_every=6)   # 8 of 48 items have an image: ranks often differ
    qwen, vae = tiny_models(root)
    common = ["--deepspeed", zero3_config(root / "z3.json"), "--data.shards", str(shards), "--train.batch_size", "4",
              "--train.max_steps", str(STEPS), "--utgrec.loss.warmup_steps", "2", "--train.log_every", str(LOG_EVERY),
              "--train.eval_every", "4", "--train.save_every_steps", str(SAVE_EVERY), "--data.heldout_items", "16",
              "--train.progress", "false", "--train.lr", "3e-3", "--utgrec.codebook.dead_code_steps", "2"]
    for k, v in tiny_overrides(qwen, vae):
        common += [f"--{k}", v]
    return full_and_resumed_runs(root, "train_tokenizer", common, HANG_AT)


def test_zero3_two_ranks_train_and_export(runs):
    m = json.loads((runs["full"] / "metrics.json").read_text())
    assert m["global_step"] == STEPS and m["resumed_from_step"] is None
    # a real ZeRO-3 checkpoint: one optimizer partition per rank
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_rank0.pt", "rng_rank1.pt"} <= set(runs["killed_files"])
    for tag in ("loss/loss", "loss/raw", "loss/code", "loss/ali", "loss/re", "loss/text", "loss/image",
                "codebook/usage_l1", "codebook/perplexity_l3", "codebook/collision_rate", "perf/samples_per_s",
                "perf/tokens_per_s"):
        assert tb_scalars(runs["full"] / "tb", tag), tag
    assert sorted(tb_scalars(runs["full"] / "tb", "loss/loss")) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    image = tb_scalars(runs["full"] / "tb", "loss/image")
    assert max(image.values()) > 0 and all(math.isfinite(v) for v in image.values())
    assert tb_scalars(runs["full"] / "tb", "codebook/restarts")[STEPS] > 0               # ZeRO-3 dead-code writes ran
    from megarec.data.codes import CodesFile

    codes = CodesFile.load(runs["full"] / "codes.safetensors")
    assert len(codes.item_keys) == 48 and {k.split("/")[0] for k in codes.item_keys} == {"Scientific", "Office"}
    assert codes.codebook_sizes == [8, 64, 64] and not codes.dedup_level
    assert len({tuple(r) for r in codes.codes.tolist()}) == 48          # unique across both domains
    for f in ("config.yaml", "model/model.safetensors", "model/config.yaml", "metrics.json"):
        assert (runs["full"] / f).is_file(), f


def test_killed_run_resumes_to_the_same_state(runs):
    assert runs["latest_at_kill"] == f"step{SAVE_EVERY}"
    full = json.loads((runs["full"] / "metrics.json").read_text())
    cut = json.loads((runs["cut"] / "metrics.json").read_text())
    assert cut["resumed_from_step"] == SAVE_EVERY and cut["global_step"] == full["global_step"]
    from safetensors.torch import load_file

    w_full = load_file(str(runs["full"] / "model" / "model.safetensors"))
    w_cut = load_file(str(runs["cut"] / "model" / "model.safetensors"))
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
    l_full, l_cut = tb_scalars(runs["full"] / "tb", "loss/loss"), tb_scalars(runs["cut"] / "tb", "loss/loss")
    assert sorted(l_cut) == sorted(l_full)
    for s in l_full:
        assert l_cut[s] == pytest.approx(l_full[s], rel=1e-5, abs=1e-6), s
    from megarec.data.codes import CodesFile

    a, b = CodesFile.load(runs["full"] / "codes.safetensors"), CodesFile.load(runs["cut"] / "codes.safetensors")
    assert a.item_keys == b.item_keys and (a.codes == b.codes).all()
