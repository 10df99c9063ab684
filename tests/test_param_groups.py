"""Optimizer parameter groups (weight-decay rules, lr multipliers) and their use by the DeepSpeed engine."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megarec.data.code_vocab import CodeVocab
from megarec.engine.deepspeed_setup import WarmupCosine, build_engine, resolve_ds_config
from megarec.engine.param_groups import param_groups
from megarec.recommender.sasrec import SASRec, SASRecConfig
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig

TINY_T5 = T5RecConfig(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8)


class Joint(nn.Module):
    """A tokenizer part, a recommender part and a frozen part (the shape of ETEGRec / UniGRec)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
        self.rec = SASRec(5, SASRecConfig(hidden=8, num_layers=1, num_heads=2, inner=16, dropout=0.0, max_len=4))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(x).sum() + self.rec.scores(hist).sum() + self.frozen(self.tokenizer(x)).sum()


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict[str, str]]:
    return {g["name"]: sorted(_names(model, g)) for g in groups}


def _assert_partition(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_t5_groups_partition_and_decay_rules():
    m = GenerativeRecommender(TINY_T5, CodeVocab([4, 4]))
    groups = param_groups(m, 0.05)
    _assert_partition(m, groups)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = (_names(m, g) for g in groups)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    # every T5LayerNorm gain and the relative position bias tables: no decay
    for name, mod in m.named_modules():
        if type(mod).__name__ == "T5LayerNorm":
            assert f"{name}.weight" in no_decay
    rel = {n for n in dict(m.named_parameters()) if "relative_attention_bias" in n}
    assert rel and rel <= no_decay
    # the tied token embedding (also the output projection) appears once, decayed by default
    assert "t5.shared.weight" in decay and sum(p is m.embedding.weight for g in groups for p in g["params"]) == 1
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert any(n.endswith(".q.weight") for n in decay) and any(n.endswith(".wi.weight") for n in decay)
    emb_off = param_groups(m, 0.05, no_decay_embeddings=True)
    _assert_partition(m, emb_off)
    assert "t5.shared.weight" in _names(m, emb_off[1])


def test_sasrec_groups_biases_norms_embeddings():
    m = SASRec(7, SASRecConfig(hidden=8, num_layers=2, num_heads=2, inner=16))
    groups = param_groups(m, 0.1)
    _assert_partition(m, groups)
    decay, no_decay = (_names(m, g) for g in groups)
    assert all(n.endswith("bias") or "norm" in n for n in no_decay)
    assert {n for n in dict(m.named_parameters()) if n.endswith("bias") or "norm." in n} == no_decay
    assert {"item_emb.weight", "pos_emb.weight", "layers.0.attention.query.weight"} <= decay
    off = param_groups(m, 0.1, no_decay_embeddings=True)
    assert {"item_emb.weight", "pos_emb.weight"} <= _names(m, off[1])


def test_lr_scale_groups_and_frozen_params():
    m = Joint()
    groups = param_groups(m, 0.01, lr_scales={"tokenizer.": 0.1, "tokenizer.2.": 0.5})
    _assert_partition(m, groups)
    names = _by_name(m, groups)
    assert names == {
        "decay": ["rec.item_emb.weight", "rec.layers.0.attention.dense.weight", "rec.layers.0.attention.key.weight",
                  "rec.layers.0.attention.query.weight", "rec.layers.0.attention.value.weight",
                  "rec.layers.0.feed_forward.dense_1.weight", "rec.layers.0.feed_forward.dense_2.weight",
                  "rec.pos_emb.weight"],
        "no_decay": sorted(n for n, p in m.rec.named_parameters(prefix="rec") if p.dim() == 1),
        "tokenizer.decay": ["tokenizer.0.weight"],
        "tokenizer.no_decay": ["tokenizer.0.bias", "tokenizer.1.bias", "tokenizer.1.weight"],
        "tokenizer.2.decay": ["tokenizer.2.weight"],           # the longest prefix wins
        "tokenizer.2.no_decay": ["tokenizer.2.bias"],
    }
    scale = {g["name"]: g["lr_scale"] for g in groups}
    assert scale["decay"] == 1.0 and scale["tokenizer.no_decay"] == 0.1 and scale["tokenizer.2.decay"] == 0.5
    assert not any("frozen" in n for ns in names.values() for n in ns)
    with pytest.raises(ValueError, match="empty prefix"):
        param_groups(m, 0.0, lr_scales={"": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        param_groups(m, 0.0, lr_scales={"rec.": 0.0})


def test_grad_clip_override():
    assert resolve_ds_config(None, micro_batch_size=4, lr=1e-3, weight_decay=0.0)["gradient_clipping"] == 1.0
    assert resolve_ds_config(None, micro_batch_size=4, lr=1e-3, weight_decay=0.0, grad_clip=0)["gradient_clipping"] == 0
    assert resolve_ds_config(None, micro_batch_size=4, lr=1e-3, weight_decay=0.0,
                             grad_clip=5.0)["gradient_clipping"] == 5.0
    from megarec.config import ConfigError
    with pytest.raises(ConfigError, match="grad_clip"):
        resolve_ds_config(None, micro_batch_size=4, lr=1e-3, weight_decay=0.0, grad_clip=-1.0)


def _joint_engine(lr: float, wd: float, warmup: int = 2, total: int = 10, grad_clip: float | None = 0.0):
    torch.manual_seed(0)
    m = Joint()
    ds = resolve_ds_config(None, micro_batch_size=2, lr=lr, weight_decay=wd, grad_clip=grad_clip)
    groups = param_groups(m, wd, lr_scales={"tokenizer.": 0.1})
    return m, build_engine(m, ds, WarmupCosine(warmup, total), model_parameters=groups)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, generator=g), torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])


def test_engine_steps_each_group_with_its_lr():
    """Adam's first update moves every parameter with a non-zero gradient by ~lr (m / sqrt(v) = sign(g)),
    so the update size tells which lr each group ran with; the schedule scales both groups."""
    lr = 1e-2
    m, engine = _joint_engine(lr, 0.0)
    assert engine.gradient_clipping() == 0
    opt_lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert opt_lrs == pytest.approx({"decay": lr * 0.5, "no_decay": lr * 0.5,                 # warmup step 0: 1/2
                                     "tokenizer.decay": lr * 0.05, "tokenizer.no_decay": lr * 0.05})
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, hist = _inputs()
    engine.backward(engine(x, hist))
    engine.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in m.named_parameters()}
    for name in ("tokenizer.0.weight", "tokenizer.2.bias"):
        assert moved[name].max().item() == pytest.approx(lr * 0.1 * 0.5, rel=2e-2), name
    for name in ("rec.layers.0.attention.query.weight", "rec.item_emb.weight"):
        assert moved[name].max().item() == pytest.approx(lr * 0.5, rel=2e-2), name
    assert moved["frozen.weight"].max().item() == 0.0
    assert engine.get_lr() == pytest.approx([lr, lr, lr * 0.1, lr * 0.1])           # step 1: warmup done
    for _ in range(5):                                                            # into the cosine
        engine.backward(engine(x, hist))
        engine.step()
    final = [g["lr"] for g in engine.optimizer.param_groups]
    assert final[2] / final[0] == pytest.approx(0.1) and 0 < final[0] < lr


def test_engine_weight_decay_only_on_decay_groups():
    """With zero gradients AdamW only decays: decay groups shrink by (1 - lr * wd), the others stay."""
    lr, wd = 0.1, 0.5
    m, engine = _joint_engine(lr, wd, warmup=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, hist = _inputs()
    engine.backward(0.0 * engine(x, hist))
    engine.step()
    after = dict(m.named_parameters())
    torch.testing.assert_close(after["rec.layers.0.attention.query.weight"].detach(),
                               before["rec.layers.0.attention.query.weight"] * (1 - lr * wd))
    torch.testing.assert_close(after["tokenizer.0.weight"].detach(), before["tokenizer.0.weight"] * (1 - lr * 0.1 * wd))
    for name in ("rec.layers.0.attention.norm.weight", "rec.layers.0.attention.query.bias", "tokenizer.1.weight"):
        torch.testing.assert_close(after[name].detach(), before[name], rtol=0, atol=0)


def test_build_engine_rejects_uniform_ds_scheduler_with_scaled_groups():
    from megarec.config import ConfigError
    from megarec.engine.deepspeed_setup import _resolve_group_lrs

    groups = param_groups(Joint(), 0.0, lr_scales={"tokenizer.": 0.1})
    ds = resolve_ds_config(None, micro_batch_size=2, lr=1e-3, weight_decay=0.0)
    assert {round(g["lr"], 6) for g in _resolve_group_lrs(groups, ds) if "lr" in g} == {1e-4}
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    with pytest.raises(ConfigError, match="WarmupLR"):
        _resolve_group_lrs(groups, ds)
    ds["scheduler"]["type"] = "WarmupCosineLR"
    _resolve_group_lrs(groups, ds)
