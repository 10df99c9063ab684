"""Code vocabulary, T5 generative recommender (hard + soft inputs), SASRec and its embedding export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megarec.config import ConfigError, load_config
from megarec.data.code_vocab import CodeVocab
from megarec.data.domain import DataError
from megarec.data.embeddings import load_item_embeddings
from megarec.recommender.sasrec import SASRec, SASRecConfig, export_item_embeddings, pad_histories
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig

TINY = T5RecConfig(num_layers=2, num_decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, dropout=0.0)


# --------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("sizes", [[4, 5, 3], [7], [2, 3, 4, 5]])
def test_vocab_token_layout(sizes):
    v = CodeVocab(sizes)
    assert v.vocab_size == 2 + sum(sizes) and v.num_levels == len(sizes)
    seen = set()
    for level, k in enumerate(sizes):
        start, end = v.level_range(level)
        assert end - start == k and start == 2 + sum(sizes[:level])
        seen |= set(range(start, end))
    assert seen == set(range(2, v.vocab_size))
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, k, 20) for k in sizes], 1)
    tok = v.item_tokens(codes)
    for level in range(len(sizes)):
        assert (tok[:, level] == 2 + sum(sizes[:level]) + codes[:, level]).all()
    np.testing.assert_array_equal(v.token_codes(tok), codes)


def test_vocab_rejects_bad_codes():
    v = CodeVocab([4, 5])
    with pytest.raises(DataError, match="item 1: code 5 at level 1"):
        v.item_tokens(np.array([[0, 0], [1, 5]]))
    with pytest.raises(DataError, match="num_items, 2"):
        v.item_tokens(np.zeros((3, 3), dtype=int))
    with pytest.raises(DataError):
        CodeVocab([])
    with pytest.raises(IndexError):
        v.level_range(2)


def test_encode_histories_right_padded_with_eos():
    v = CodeVocab([3, 3])
    tok = v.item_tokens(np.array([[0, 1], [2, 2], [1, 0]]))
    ids, mask = v.encode_histories([np.array([0, 1, 2]), np.array([2])], tok, max_items=2)
    assert ids.tolist() == [[tok[1, 0], tok[1, 1], tok[2, 0], tok[2, 1], 1], [tok[2, 0], tok[2, 1], 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(DataError, match="outside"):
        v.encode_histories([np.array([3])], tok)


@pytest.mark.parametrize("append_eos", [True, False])
def test_encode_histories_equals_per_row_reference(append_eos, monkeypatch):
    """The vectorised encoding = the obvious per-row one, on ragged histories (empty, longer than
    max_items), in int64 and in the compact int16 the training sets store."""
    v = CodeVocab([4, 5, 3])
    rng = np.random.default_rng(0)
    tok = v.item_tokens(np.stack([rng.integers(0, k, 50) for k in (4, 5, 3)], 1))
    hists = [rng.integers(0, 50, n) for n in (0, 1, 7, 3, 12, 0, 5)]
    ids, mask = v.encode_histories(hists, tok, max_items=6, append_eos=append_eos)
    rows = [np.concatenate([tok[h[-6:]].reshape(-1), [1] if append_eos else []]).astype(int) for h in hists]
    width = max(max(len(r) for r in rows), 1)
    assert ids.dtype == torch.int64 and ids.shape == (len(hists), width)
    for i, r in enumerate(rows):
        assert ids[i].tolist() == [*r.tolist(), *[0] * (width - len(r))]
        assert mask[i].tolist() == [1] * len(r) + [0] * (width - len(r))
    small, small_mask = v.encode_histories(hists, tok, max_items=6, append_eos=append_eos, dtype=torch.int16)
    assert small.dtype == torch.int16 and torch.equal(small.long(), ids) and torch.equal(small_mask.long(), mask)
    monkeypatch.setattr(CodeVocab, "ENCODE_CHUNK", 3)   # rows in several passes: the same result
    assert torch.equal(v.encode_histories(hists, tok, max_items=6, append_eos=append_eos)[0], ids)


def test_scatter_level_probs_places_each_level():
    v = CodeVocab([2, 3])
    p0 = torch.tensor([[0.25, 0.75]], requires_grad=True)
    p1 = torch.tensor([[0.5, 0.2, 0.3]], requires_grad=True)
    out = v.scatter_level_probs([p0, p1])
    assert out.shape == (1, 2, 7)
    assert out[0, 0].tolist() == [0, 0, 0.25, 0.75, 0, 0, 0]
    assert torch.allclose(out[0, 1], torch.tensor([0, 0, 0, 0, 0.5, 0.2, 0.3]))
    (out * torch.arange(7.0)).sum().backward()
    assert p0.grad.tolist() == [[2.0, 3.0]] and p1.grad.tolist() == [[4.0, 5.0, 6.0]]
    with pytest.raises(ValueError, match="level 1"):
        v.scatter_level_probs([p0, p0])


# --------------------------------------------------------------------------- T5
def _batch(v: CodeVocab, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, 12) for k in v.codebook_sizes], 1)
    tok = v.item_tokens(codes)
    ids, mask = v.encode_histories([rng.integers(0, 12, n) for n in (4, 2, 3)], tok)
    labels = torch.from_numpy(tok[rng.integers(0, 12, 3)])
    return tok, ids, mask, labels


def test_t5_config_defaults_and_validation():
    cfg = T5RecConfig()
    assert (cfg.num_layers, cfg.num_decoder_layers, cfg.d_model, cfg.d_ff, cfg.num_heads) == (6, 6, 128, 512, 4)
    assert load_config(T5RecConfig, overrides=["--num_layers", "3"]).num_layers == 3
    with pytest.raises(ConfigError, match="dropout"):
        load_config(T5RecConfig, overrides=["--dropout", "1.5"])
    m = GenerativeRecommender(T5RecConfig(), CodeVocab([8, 8, 8]))
    assert len(m.t5.encoder.block) == 6 and len(m.t5.decoder.block) == 6
    assert m.t5.config.decoder_start_token_id == 0 and m.t5.config.vocab_size == 26


def test_t5_hard_path_is_hf_t5_and_loss_is_mean_token_ce():
    v = CodeVocab([4, 5, 3])
    torch.manual_seed(0)
    m = GenerativeRecommender(TINY, v).eval()
    _, ids, mask, labels = _batch(v)
    out = m(ids, mask, labels)
    ref = m.t5(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert out.logits.shape == (3, 3, v.vocab_size)
    ce = -out.logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, ce)
    # the decoder reads [PAD, y1, y2]: changing the last label cannot change position 0's logits
    other = labels.clone()
    other[:, -1] = v.level_range(2)[0]
    torch.testing.assert_close(m(ids, mask, other).logits[:, 0], out.logits[:, 0])


def test_t5_soft_one_hot_equals_hard():
    v = CodeVocab([4, 5, 3])
    torch.manual_seed(1)
    m = GenerativeRecommender(TINY, v).eval()
    _, ids, mask, labels = _batch(v, seed=1)
    hard = m(ids, mask, labels, output_hidden_states=True)
    soft = m(None, mask, labels, soft_inputs=v.one_hot(ids), decoder_soft_inputs=v.one_hot(labels),
             output_hidden_states=True)
    torch.testing.assert_close(soft.logits, hard.logits, rtol=0, atol=0)
    torch.testing.assert_close(soft.encoder_last_hidden_state, hard.encoder_last_hidden_state, rtol=0, atol=0)
    assert len(hard.decoder_hidden_states) == TINY.num_decoder_layers + 1
    enc = m.encode(ids, mask)
    torch.testing.assert_close(enc.last_hidden_state, hard.encoder_last_hidden_state)


def test_t5_soft_inputs_are_probability_weighted_embeddings_with_gradient():
    v = CodeVocab([4, 5, 3])
    torch.manual_seed(2)
    m = GenerativeRecommender(TINY, v).eval()
    _, ids, mask, labels = _batch(v, seed=2)
    logits = torch.randn(ids.shape[0], ids.shape[1], v.vocab_size, requires_grad=True)
    probs = logits.softmax(-1)
    emb = m.embed(soft_inputs=probs)
    torch.testing.assert_close(emb, torch.einsum("btv,vd->btd", probs, m.embedding.weight))
    m(None, mask, labels, soft_inputs=probs).loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vocab_size"):
        m.embed(soft_inputs=probs[..., :-1])
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, mask, labels, soft_inputs=probs)


def test_t5_sequence_log_probs_matches_teacher_forcing():
    v = CodeVocab([3, 2, 2])
    torch.manual_seed(3)
    m = GenerativeRecommender(TINY, v).eval()
    tok, ids, mask, _ = _batch(v, seed=3)
    items = torch.from_numpy(tok[:5])
    lp = m.sequence_log_probs(ids, mask, items)
    for b in range(ids.shape[0]):
        for n in range(5):
            out = m(ids[b:b + 1], mask[b:b + 1], items[n:n + 1])
            want = out.logits.log_softmax(-1)[0, torch.arange(3), items[n]].sum()
            torch.testing.assert_close(lp[b, n], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SASRec
SMALL = SASRecConfig(hidden=16, num_layers=1, num_heads=2, inner=32, dropout=0.0, max_len=6)


def test_sasrec_causal_and_padding_side():
    torch.manual_seed(0)
    m = SASRec(9, SMALL).eval()
    hist = [np.array([3, 1, 4]), np.array([5, 8, 2, 0, 7])]
    left, right = pad_histories(hist, 6), pad_histories(hist, 6, left=False)
    assert left[0].tolist() == [0, 0, 0, 4, 2, 5] and right[0].tolist() == [4, 2, 5, 0, 0, 0]
    torch.testing.assert_close(m(left), m(right), rtol=1e-5, atol=1e-5)
    # causal: the state after a prefix does not depend on later items
    states = m.hidden_states(right)
    changed = right.clone()
    changed[1, 4] = 1
    torch.testing.assert_close(m.hidden_states(changed)[1, :4], states[1, :4])
    assert not torch.allclose(m.hidden_states(changed)[1, 4], states[1, 4])
    # single-item rows work too and give no NaN
    assert torch.isfinite(m(pad_histories([np.array([2])], 6))).all()
    with pytest.raises(ValueError, match="at least one item"):
        m(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="T<=6"):
        m(torch.ones(1, 7, dtype=torch.long))
    assert m.scores(left).shape == (2, 9)
    torch.testing.assert_close(m.scores(left), m(left) @ m.item_emb.weight[1:].T)


# RecBole's SASRec written out with plain torch ops (recbole/model/layers.py: MultiHeadAttention,
# FeedForward, TransformerLayer; sequential_recommender/sasrec.py: forward, get_attention_mask,
# calculate_loss with loss_type CE), on RecBole's parameter names and right-padded histories.
def _to_recbole_names(m: SASRec) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in m.state_dict().items():
        name = (name.replace("item_emb.", "item_embedding.").replace("pos_emb.", "position_embedding.")
                .replace("layers.", "trm_encoder.layer.").replace(".attention.", ".multi_head_attention.")
                .replace(".norm.", ".LayerNorm.").replace("norm.", "LayerNorm."))
        out[name] = t.clone()
    return out


def _recbole_forward(w: dict[str, torch.Tensor], item_seq: torch.Tensor, item_seq_len: torch.Tensor,
                     n_layers: int, n_heads: int, p_hidden: float, p_attn: float, train: bool,
                     eps: float = 1e-12) -> torch.Tensor:
    import math

    def ln(x, pre):
        return F.layer_norm(x, x.shape[-1:], w[pre + "LayerNorm.weight"], w[pre + "LayerNorm.bias"], eps)

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    b, t = item_seq.shape
    pos = torch.arange(t).unsqueeze(0).expand_as(item_seq)
    x = w["item_embedding.weight"][item_seq] + w["position_embedding.weight"][pos]
    x = F.dropout(ln(x, ""), p_hidden, train)
    mask = (item_seq > 0).long().unsqueeze(1).unsqueeze(2) * (torch.triu(torch.ones(1, t, t), 1) == 0).unsqueeze(1).long()
    ext = (1.0 - mask.float()) * -10000.0
    hd = x.shape[-1] // n_heads
    for i in range(n_layers):
        a = f"trm_encoder.layer.{i}.multi_head_attention."
        q, k, v = (dense(x, a + n).view(b, t, n_heads, hd).permute(0, 2, 1, 3) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + ext, dim=-1)
        ctx = (F.dropout(probs, p_attn, train) @ v).permute(0, 2, 1, 3).reshape(b, t, -1)
        x = ln(F.dropout(dense(ctx, a + "dense"), p_hidden, train) + x, a)
        f = f"trm_encoder.layer.{i}.feed_forward."
        h = dense(x, f + "dense_1")
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = ln(F.dropout(dense(h, f + "dense_2"), p_hidden, train) + x, f)
    return x[torch.arange(b), item_seq_len - 1]


def _recbole_case(seed: int = 0):
    torch.manual_seed(seed)
    cfg = SASRecConfig(hidden=16, num_layers=2, num_heads=2, inner=32, dropout=0.3, attn_dropout=0.2, max_len=6)
    m = SASRec(11, cfg)
    with torch.no_grad():   # non-trivial LayerNorm gains / biases and Linear biases
        for name, t in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                t.add_(0.1 * torch.randn_like(t))
    hist = [np.array([3, 1, 4]), np.array([5, 8, 2, 0, 7, 9]), np.array([10]), np.array([6, 6])]
    lengths = torch.tensor([len(h) for h in hist])
    return m, cfg, hist, lengths


def test_sasrec_matches_recbole_reference_eval():
    """Scores and CE loss equal RecBole's formulas on copied weights (left or right padding)."""
    m, cfg, hist, lengths = _recbole_case()
    m.eval()
    w = _to_recbole_names(m)
    right = pad_histories(hist, 6, left=False)
    want = _recbole_forward(w, right, lengths, 2, 2, 0.3, 0.2, train=False)
    for padded in (right, pad_histories(hist, 6)):
        torch.testing.assert_close(m(padded), want, rtol=1e-5, atol=1e-5)
    logits = want @ w["item_embedding.weight"].T      # RecBole: the whole table, padding row included
    torch.testing.assert_close(m.scores(right), logits[:, 1:], rtol=1e-5, atol=1e-5)
    target = torch.tensor([0, 4, 10, 7])
    torch.testing.assert_close(m.loss(right, target), F.cross_entropy(logits, target + 1), rtol=1e-5, atol=1e-6)
    assert m.scores(right).dtype == torch.float32


def test_sasrec_dropout_once_per_sublayer_like_recbole():
    """Train mode, same seed: dropout masks are drawn exactly where RecBole draws them (embeddings;
    attention weights, attention output and feed-forward output of each layer), so the outputs
    are equal; a second dropout in the feed-forward block would shift every later mask."""
    m, cfg, hist, lengths = _recbole_case(1)
    m.train()
    ffn = m.layers[0].feed_forward
    assert sum(isinstance(x, torch.nn.Dropout) for x in ffn.modules()) == 1
    assert sum(isinstance(x, torch.nn.Dropout) for x in m.modules()) == 1 + 3 * cfg.num_layers
    right = pad_histories(hist, 6, left=False)
    torch.manual_seed(123)
    got = m(right)
    torch.manual_seed(123)
    want = _recbole_forward(_to_recbole_names(m), right, lengths, 2, 2, 0.3, 0.2, train=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.manual_seed(124)
    assert not torch.allclose(m(right), want)      # dropout is really on


def test_sasrec_init_like_recbole():
    torch.manual_seed(0)
    m = SASRec(2000, SASRecConfig(hidden=64, inner=256))
    for name, t in m.named_parameters():
        if "norm" in name:
            assert (t == (1.0 if name.endswith("weight") else 0.0)).all(), name
        elif name.endswith("bias"):
            assert (t == 0).all(), name
        else:
            assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002, name
    assert m.item_emb.weight[0].abs().sum() > 0     # RecBole's init overwrites the padding row too


def test_sasrec_bf16_scores_are_fp32_without_ties():
    """A bf16 model scores in fp32 (upcast state and embeddings): no ties that fp32 does not have."""
    torch.manual_seed(0)
    m = SASRec(500, SASRecConfig(hidden=32, num_layers=1, inner=64, max_len=6)).eval()
    hist = pad_histories([np.array([1, 2, 3]), np.array([7])], 6)
    half = SASRec(500, m.cfg).eval()
    half.load_state_dict(m.state_dict())
    half = half.to(torch.bfloat16)
    s = half.scores(hist)
    assert s.dtype == torch.float32 and half.logits(hist).dtype == torch.float32
    assert all(len(torch.unique(row)) == 500 for row in s)
    rounded = (half(hist) @ half.item_emb.weight[1:].T)      # what a bf16 product would give
    assert any(len(torch.unique(row)) < 500 for row in rounded)
    torch.testing.assert_close(s, m.scores(hist), rtol=0, atol=0.05)


def test_sasrec_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(SASRecConfig, overrides=["--hidden", "63"])
    cfg = SASRecConfig()
    assert (cfg.hidden, cfg.num_layers, cfg.num_heads, cfg.inner, cfg.dropout, cfg.max_len) == (64, 2, 2, 256, 0.5, 50)
    assert cfg.attn_dropout is None and cfg.attention_dropout == 0.5          # RecBole: 0.5 and 0.5
    assert load_config(SASRecConfig, overrides=["--attn_dropout", "0.2"]).attention_dropout == 0.2


def test_sasrec_learns_a_toy_pattern():
    """Item i is always followed by item (i + 1) mod n: CE falls and the next item ranks first."""
    torch.manual_seed(0)
    n = 20
    m = SASRec(n, SASRecConfig(hidden=32, num_layers=1, num_heads=2, inner=64, dropout=0.1, max_len=5))
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n, 256)
    lengths = rng.integers(1, 6, 256)
    hist = pad_histories([(s + np.arange(L)) % n for s, L in zip(starts, lengths)], 5)
    target = torch.from_numpy((starts + lengths) % n)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = m.loss(hist, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    m.eval()
    acc = (m.scores(hist).argmax(1) == target).float().mean().item()
    assert acc > 0.9


def test_sasrec_embedding_export_round_trip(tmp_path):
    torch.manual_seed(0)
    m = SASRec(7, SMALL)
    keys = [f"toys/i{i}" for i in range(7)]
    export_item_embeddings(m, keys, tmp_path / "emb.safetensors")
    emb, ekeys = load_item_embeddings(tmp_path / "emb.safetensors", keys[::-1])
    assert ekeys == keys[::-1]
    torch.testing.assert_close(emb, m.item_emb.weight[1:].detach().flip(0))
    with pytest.raises(ValueError, match="item keys"):
        export_item_embeddings(m, keys[:3], tmp_path / "x.safetensors")


def test_export_embeddings_command(tmp_path, capsys):
    """`megarec export-embeddings RUN --out F` on a (tiny) trained SASRec run of the embedded sample."""
    from megarec.cli import main
    from megarec.data.sample import sample_paths
    from megarec.methods.training import load_trained

    run = tmp_path / "run"
    assert main(["train-rec", "--method", "sasrec", "--profile", "tiny", "--data.paths", str(sample_paths()[0]),
                 "--train.run_dir", str(run)]) == 0
    assert main(["export-embeddings", str(run), "--out", str(tmp_path / "sasrec.safetensors")]) == 0
    trained = load_trained(run)
    emb, keys = load_item_embeddings(tmp_path / "sasrec.safetensors")
    assert keys == trained.item_keys() and keys[0].startswith("Scientific/")
    torch.testing.assert_close(emb, trained.recommender.ranker.model.item_embeddings().detach())
    capsys.readouterr()
    assert main(["export-embeddings", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a trained model" in capsys.readouterr().err
