"""bf16 correctness: exported weights are the fp32 masters; scores and beam log-probabilities are fp32.

The CPU tests run DeepSpeed's bf16 path on the CPU accelerator (ZeRO 0: FP16_UnfusedOptimizer;
ZeRO 1: BF16_Optimizer; ZeRO 3); the CUDA test (skipped without a GPU; run it with
``DS_ACCELERATOR=cuda python -m pytest -q tests/test_bf16.py -k cuda``) covers the GPU
optimizers (ZeRO 0 there is the fused FP16_Optimizer with one flat fp32 tensor per group).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from megarec.data.code_vocab import CodeVocab
from megarec.engine.checkpoint import (export_safetensors, fp32_master, gather_state_dict, link_fp32_masters,
                                       read_weights)
from megarec.engine.deepspeed_setup import build_engine, resolve_ds_config
from megarec.recommender.beam_search import beam_search
from megarec.recommender.sasrec import SASRec, SASRecConfig, pad_histories
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
from megarec.recommender.trie import ItemTrie

TINY = T5RecConfig(num_layers=1, num_decoder_layers=1, d_model=32, d_ff=64, num_heads=2, d_kv=16, dropout=0.0)


def _ds(stage: int, lr: float) -> dict:
    return resolve_ds_config({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 0.0, "bf16": {"enabled": True},
                              "zero_optimization": {"stage": stage},
                              "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}},
                             micro_batch_size=4, lr=lr, weight_decay=0.0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 1))
    m[2].requires_grad_(False)                     # a frozen part: exported as it is
    return m


def _train(engine, steps: int = 4) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 16, device=engine.device).to(torch.bfloat16)
    for _ in range(steps):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()


def _masters(engine, module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 masters straight from DeepSpeed's optimizer (independent of fp32_master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):        # ZeRO 0, unfused
        pairs = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
        return {n: pairs[id(p)].detach().float().cpu() for n, p in module.named_parameters() if p.requires_grad}
    if hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups"):   # ZeRO 0, fused (GPU)
        out, names = {}, {id(p): n for n, p in module.named_parameters()}
        for lg, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            chunks = torch.split(flat.detach(), [p.numel() for p in lg])
            out.update({names[id(p)]: c.view(p.shape).float().cpu() for p, c in zip(lg, chunks)})
        return out
    return {n: safe_get_full_fp32_param(p).detach().float().cpu()
            for n, p in module.named_parameters() if p.requires_grad}


def _check_export(engine, tmp_path) -> None:
    module = engine.module
    state = gather_state_dict(module)
    masters = _masters(engine, module)
    assert set(masters) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name, want in masters.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], want, rtol=0, atol=0)
    # the updates (Adam, lr 1e-4) are far below bf16's resolution of these weights: the module's
    # bf16 copies did not move, the masters did, so a bf16 upcast would lose the training
    w = state["0.weight"]
    assert (w.bfloat16().float() != w).any(), "exported weights are bf16-rounded"
    assert not torch.equal(w, module[0].weight.detach().float().cpu())
    assert state["2.weight"].dtype == torch.float32           # frozen, no master: the module's own values
    export_safetensors(module, tmp_path / "model.safetensors")
    back, _ = read_weights(tmp_path / "model.safetensors")
    for name, t in state.items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=0)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_export_writes_fp32_masters_of_bf16_engine_cpu(stage, tmp_path):
    engine = build_engine(_mlp(), _ds(stage, 1e-4))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    _train(engine)
    _check_export(engine, tmp_path)


def test_link_fp32_masters_flat_layout():
    """FP16_Optimizer (ZeRO 0 on GPU) keeps one flat fp32 tensor per group, parameters in group order."""
    a = nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    c = nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))

    class FakeFused:
        fp16_groups = [[a, b], [c]]
        fp32_groups_flat = [torch.arange(10, dtype=torch.float32), torch.arange(5, dtype=torch.float32) + 100]

    opt = FakeFused()
    assert link_fp32_masters(opt) == 3
    torch.testing.assert_close(fp32_master(a), torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(fp32_master(b), torch.arange(6.0, 10.0))
    torch.testing.assert_close(fp32_master(c), torch.arange(5.0) + 100)
    opt.fp32_groups_flat[0] = opt.fp32_groups_flat[0] + 0.5      # read at export time, not at link time
    assert fp32_master(b)[0].item() == 6.5
    assert fp32_master(nn.Parameter(torch.zeros(3))) is None      # fp32: its own master
    assert link_fp32_masters(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)) == 0


# --------------------------------------------------------------------------- fp32 logits / scores
def _t5_case(dtype: torch.dtype, device: str = "cpu"):
    v = CodeVocab([16, 16, 16])
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 16, (300, 3)), axis=0)
    tok = v.item_tokens(codes)
    torch.manual_seed(0)
    m = GenerativeRecommender(TINY, v).eval()
    with torch.no_grad():                 # logits with a spread (an untrained T5 is nearly flat)
        m.embedding.weight.mul_(40.0)
    m = m.to(device=device, dtype=dtype)
    ids, mask = v.encode_histories([rng.integers(0, len(tok), n) for n in (5, 3, 8, 1)], tok)
    trie = ItemTrie(tok, 3, v).to(device)
    return m, v, torch.from_numpy(tok), ids.to(device), mask.to(device), trie


def _assert_fp32_beam(m, ids, mask, trie, tok) -> None:
    items, scores = beam_search(m, ids, mask, trie, 20)
    assert scores.dtype == torch.float32
    for row in scores:
        assert len(torch.unique(row)) == len(row), "tied beam scores"
    # the beam's scores are the teacher-forced log-probabilities of its items (up to bf16 noise in the
    # hidden states: incremental and full decoding round differently)
    exact = m.sequence_log_probs(ids, mask, tok.to(ids.device))
    assert exact.dtype == torch.float32
    torch.testing.assert_close(scores, exact.gather(1, items), rtol=1e-2, atol=1e-2)


def test_t5_bf16_logits_and_beam_scores_are_fp32_cpu():
    m, v, tok, ids, mask, trie = _t5_case(torch.bfloat16)
    labels = tok[:4]
    out = m(ids, mask, labels, output_hidden_states=True)
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert m.t5.lm_head.weight is m.embedding.weight                     # still tied
    hidden = out.decoder_hidden_states[-1] * (TINY.d_model ** -0.5)
    torch.testing.assert_close(out.logits, hidden.float() @ m.embedding.weight.float().T)
    assert any(len(torch.unique(r)) < len(r) for r in (hidden @ m.embedding.weight.T).view(-1, v.vocab_size)), \
        "a bf16 product would tie"
    _assert_fp32_beam(m, ids, mask, trie, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):                    # autocast cannot lower the head
        assert m(ids, mask, labels).logits.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_on_cuda(stage, tmp_path):
    from megarec.engine.deepspeed_setup import accelerator_name

    if accelerator_name() != "cuda":
        pytest.skip("run with DS_ACCELERATOR=cuda (tests/conftest.py defaults it to cpu)")
    engine = build_engine(_mlp(), _ds(stage, 1e-4))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    _train(engine)
    _check_export(engine, tmp_path)
    if stage == 0:
        m, v, tok, ids, mask, trie = _t5_case(torch.bfloat16, "cuda")
        assert m(ids, mask, tok[:4].cuda()).logits.dtype == torch.float32
        _assert_fp32_beam(m, ids, mask, trie, tok)
        torch.manual_seed(0)
        s = SASRec(2000, SASRecConfig(hidden=32, num_layers=1, inner=64, max_len=6)).eval().cuda().bfloat16()
        scores = s.scores(pad_histories([np.array([1, 2, 3]), np.array([7])], 6).cuda())
        assert scores.dtype == torch.float32
        assert all(len(torch.unique(r)) == 2000 for r in scores)
