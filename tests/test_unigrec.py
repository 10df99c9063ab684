"""UniGRec (megarec.methods.unigrec.plugin*): each loss against a naive formula (Eq. 14's sign, KL,
InfoNCE, uniformity, Eq. 22), soft inputs (Eq. 15) vs the hard path, gradients of L_Rec into
the tokenizer, parameter groups, a 1-rank run through the real trainer and ``megarec recommend``.

The 2-rank ZeRO-3 kill-and-resume run is in test_unigrec_dist.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megarec.methods.joint.samples import CodeTable
from megarec.methods.unigrec.plugin import UniGRecConfig, UniGRecSamples, combine
from megarec.methods.unigrec.losses import (code_log_probs, joint_loss, recommender_distillation,
                                            residual_log_probs, symmetric_kl)
from megarec.methods.unigrec.model import UniGRecModel, UniGRecTerms, soft_history_embeddings
from tests.dist import tb_scalars
from tests.test_train_rec import write_domain

TINY = ["--profile", "tiny", "--method", "unigrec"]


# --------------------------------------------------------------------------- fixtures
def make_inputs(root: Path, n_users: int = 40, n_items: int = 20, dim: int = 16, seed: int = 5) -> dict:
    """A domain, random 'text' embeddings with a tiny soft RQ-VAE pre-trained on them, and random
    'SASRec' teacher embeddings."""
    from megarec.config import TokenizerConfig, load_config
    from megarec.data.domain import MultiDomain
    from megarec.data.embeddings import save_item_embeddings
    from megarec.data.readers import read_domain
    from megarec.tokenizer.train import train_rqvae

    a = write_domain(root, "A", n_users, n_items, seed=seed)
    keys = MultiDomain([read_domain(a)]).item_keys()
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(len(keys), dim, generator=g), dim=1)
    save_item_embeddings(root / "text.safetensors", text, keys, source="test")
    save_item_embeddings(root / "teacher.safetensors", torch.randn(len(keys), 8, generator=g), keys, source="test")
    cfg = load_config(TokenizerConfig, None, [
        ("epochs", "20"), ("rqvae.hidden", "32"), ("rqvae.code_dim", "8"), ("rqvae.codebook_sizes", "4,4"),
        ("rqvae.dead_code_steps", "0"), ("rqvae.quantizer", "soft"), ("rqvae.tau_max", "1.0"),
        ("rqvae.tau_min", "0.1"), ("kmeans_samples", "64"), ("device", "cpu")])
    model, _ = train_rqvae(text, cfg, progress=False)
    model.save(root / "tok", cfg, {"input": "embeddings", "embeddings": str(root / "text.safetensors")})
    return {"domain": a, "text": root / "text.safetensors", "teacher": root / "teacher.safetensors",
            "tok": root / "tok", "keys": keys}


def naive_probs(x: torch.Tensor, C: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 14 written out: exp(-||x - e_k||^2 / tau) / sum_j exp(-||x - e_j||^2 / tau), row by row."""
    out = torch.empty(x.shape[0], C.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        d = torch.tensor([float(((x[i] - C[k]) ** 2).sum()) for k in range(C.shape[0])], dtype=torch.float64)
        w = torch.exp(-(d - d.min()) / tau)
        out[i] = w / w.sum()
    return out


def tiny_model(sizes=(4, 4), dedup: int = 3, in_dim=12, code_dim=6, n_items=10, t_dim=5, seed=0,
               identifiers="soft", frozen=False, cd=(True, True), teacher_map="fixed") -> UniGRecModel:
    from megarec.config import RQVAEConfig
    from megarec.data.code_vocab import CodeVocab
    from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
    from megarec.tokenizer.rqvae import RQVAE

    torch.manual_seed(seed)
    tok = RQVAE(in_dim, RQVAEConfig(hidden=[16], code_dim=code_dim, codebook_sizes=list(sizes), dead_code_steps=0,
                                    quantizer="soft"))
    rec = GenerativeRecommender(T5RecConfig(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2,
                                            d_kv=8, dropout=0.0), CodeVocab([*sizes, dedup]))
    i = torch.arange(n_items)
    codes = torch.stack([i % sizes[0], i // sizes[0] % sizes[1], i % dedup], 1)
    return UniGRecModel(rec, tok, torch.randn(n_items, in_dim), torch.randn(n_items, t_dim), codes, tau=0.5,
                        identifiers=identifiers, cd_t=cd[0], cd_r=cd[1], tokenizer_frozen=frozen,
                        teacher_map=teacher_map)


def tiny_batch(model: UniGRecModel, B: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = model.item_emb.shape[0]
    table = CodeTable(model.vocab, model.item_codes)
    items = torch.randint(0, n, (B, 3), generator=g)
    items[0, 2] = -1                                    # shorter histories
    items[2, 1:] = -1
    samples = UniGRecSamples(items, (items >= 0).sum(1).numpy(), torch.randint(0, n, (B,), generator=g), table)
    samples.targets[1] = samples.targets[0]             # a repeated target
    return samples.batch(np.arange(B), "cpu")


def run_model(model: UniGRecModel, b: dict[str, torch.Tensor]) -> UniGRecTerms:
    return model(b["items"], b["counts"], b["input_ids"], b["attention_mask"], b["labels"], b["targets"])


# --------------------------------------------------------------------------- losses vs naive formulas
def test_code_distributions_have_the_papers_sign():
    """Eq. 14: logit = -d^2 / tau, so the nearest codeword is the most probable (the public code's
    +d makes the farthest one win)."""
    from megarec.kernels import code_probs, nearest_code
    from megarec.tokenizer.soft import SoftResidualQuantizer

    g = torch.Generator().manual_seed(0)
    x, C = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    for tau in (0.05, 1.0, 10.0):
        lp = code_log_probs(x, C, tau)
        torch.testing.assert_close(lp.exp().double(), naive_probs(x, C, tau), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lp.exp(), code_probs(x, C, tau), rtol=1e-5, atol=1e-6)
        assert torch.equal(lp.argmax(1), nearest_code(x, C)[0])
        assert torch.equal(lp.argmin(1), torch.cdist(x, C).argmax(1))      # farthest = least probable
    q = SoftResidualQuantizer([9, 9], 5)
    out = q(x, 0.5)
    assert torch.equal(out.probs[0].argmax(1), nearest_code(x, q.codebook(0).detach())[0])
    lps = residual_log_probs(out.inputs, q.codebooks(), 0.5)
    for lp, p in zip(lps, out.probs):
        torch.testing.assert_close(lp.exp(), p, rtol=1e-5, atol=1e-6)


def test_log_probs_stay_finite_at_tau_min():
    x, C = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.1], [3.0, 3.0]])
    lp = code_log_probs(x, C, 0.001)
    assert torch.isfinite(lp).all() and lp[0, 1] < -1000          # would underflow to log 0 as a probability


def test_symmetric_kl_matches_the_naive_sum_of_two_kls():
    g = torch.Generator().manual_seed(1)
    p = [torch.log_softmax(torch.randn(5, k, generator=g), 1) for k in (4, 6)]
    q = [torch.log_softmax(torch.randn(5, k, generator=g), 1) for k in (4, 6)]
    naive = 0.0
    for lp, lq in zip(p, q):
        P, Q = lp.exp().double(), lq.exp().double()
        for i in range(5):
            naive += float((P[i] * (P[i] / Q[i]).log()).sum() + (Q[i] * (Q[i] / P[i]).log()).sum()) / 5
    assert float(symmetric_kl(p, q)) == pytest.approx(naive, rel=1e-5)
    torch.testing.assert_close(symmetric_kl(p, q), sum(F.kl_div(b, a, log_target=True, reduction="batchmean")
                                                       + F.kl_div(a, b, log_target=True, reduction="batchmean")
                                                       for a, b in zip(p, q)), rtol=1e-5, atol=1e-6)
    assert float(symmetric_kl(p, p)) == pytest.approx(0.0, abs=1e-7)


def test_recommender_distillation_is_eqs_19_20():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    tau = 0.07

    def nce(A, B):   # Eq. 19, mean over rows
        s = torch.tensor([[float(F.cosine_similarity(A[i], B[j], dim=0)) for j in range(6)] for i in range(6)])
        return float(-torch.log_softmax(s.double() / tau, 1).diagonal().mean())

    assert float(recommender_distillation(a, b, tau)) == pytest.approx(nce(a, b) + nce(b, a), rel=1e-4)


def test_uniformity_is_eq17():
    from megarec.tokenizer.soft import uniformity_loss

    g = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(8, k, generator=g), 1) for k in (3, 5)]
    naive = 0.0
    for p in probs:
        for k in range(p.shape[1]):
            pbar = sum(float(p[i, k]) for i in range(8)) / 8
            naive += pbar * math.log(pbar)
    assert float(uniformity_loss(probs)) == pytest.approx(naive, rel=1e-5)
    uniform = [torch.full((4, 5), 0.2)]
    assert float(uniformity_loss(uniform)) == pytest.approx(-math.log(5), rel=1e-6)   # its minimum


def test_joint_loss_is_eq22():
    s = UniGRecConfig(recon_weight=0.5, cd_t_weight=0.05, cd_r_weight=0.2)
    t = UniGRecTerms(*[torch.tensor(v) for v in (2.0, 3.0, 5.0, 7.0, -1.0)])
    out = combine(t, s)
    assert float(out["loss"]) == pytest.approx(2.0 + 0.5 * 3.0 + 0.05 * 5.0 + 0.2 * 7.0)
    assert float(joint_loss(*t[:4], 1.0, 0.0, 0.0)) == 5.0
    assert set(out) == {"loss", "rec", "recon", "cd_t", "cd_r", "uniformity"}


# --------------------------------------------------------------------------- model
def test_one_hot_soft_inputs_are_the_hard_path():
    """Eq. 15 with one-hot probabilities is the embedding lookup of the hard tokens (EOS, PAD included)."""
    model = tiny_model()
    b = tiny_batch(model)
    uniq = torch.arange(model.item_emb.shape[0])
    probs = [F.one_hot(model.item_codes[:, level], k).float()
             for level, k in enumerate(model.tokenizer.codebook_sizes)]
    level_emb = model.item_token_embeddings(probs, uniq)
    x, mask = soft_history_embeddings(level_emb, b["items"], b["counts"], model.recommender.embedding.weight)
    assert torch.equal(mask, b["attention_mask"])
    torch.testing.assert_close(x, model.recommender.embedding(b["input_ids"]))


def test_item_token_embeddings_are_eq15_scatter_then_table():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    uniq = torch.tensor([0, 3, 7])
    probs = [torch.softmax(torch.randn(3, k, generator=g), 1) for k in model.tokenizer.codebook_sizes]
    E = model.recommender.embedding.weight
    one_hot_dedup = F.one_hot(model.item_codes[uniq, 2], model.vocab.codebook_sizes[2]).float()
    scattered = model.vocab.scatter_level_probs([*probs, one_hot_dedup]) @ E    # Eq. 15: scatter(0, p_l) . O
    torch.testing.assert_close(model.item_token_embeddings(probs, uniq), scattered, rtol=1e-5, atol=1e-6)


def test_rec_loss_reaches_the_tokenizer_only_with_soft_identifiers():
    for identifiers in ("soft", "hard"):
        model = tiny_model(identifiers=identifiers, cd=(False, False))
        terms = run_model(model, tiny_batch(model))
        terms.rec.backward()
        grads = [p.grad for p in model.tokenizer.encoder.parameters()] + \
                [p.grad for p in model.tokenizer.quantizer.codebooks()]
        norm = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert (norm > 0) == (identifiers == "soft"), (identifiers, norm)
        assert all(p.grad is None for p in model.tokenizer.decoder.parameters())   # L_Rec does not decode


def test_every_term_is_finite_and_every_trainable_parameter_gets_a_gradient():
    model = tiny_model()
    model.tau = model.cd_t_tau = 0.001                                   # tau_min: sharp distributions
    terms = run_model(model, tiny_batch(model))
    assert all(torch.isfinite(t.detach()) for t in terms) and float(terms.cd_t.detach()) > 0 < float(terms.cd_r.detach())
    combine(terms, UniGRecConfig())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing


def test_param_groups_hold_every_trainable_parameter_and_a_frozen_tokenizer_stays_in_eval():
    from megarec.methods.unigrec.plugin import UniGRecMethod
    from megarec.train_rec import parse_args

    cfg = parse_args([*TINY, "--train.lr", "0.005", "--unigrec.tokenizer_lr", "2e-7"])
    model = tiny_model()
    groups = UniGRecMethod().param_groups(cfg, model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(ids) == len(set(ids))
    tok = {id(p) for p in model.tokenizer.parameters()}
    for g in groups:
        on_tok = {id(p) in tok for p in g["params"]}
        assert len(on_tok) == 1
        assert g["lr_scale"] == pytest.approx(2e-7 / 0.005 if on_tok.pop() else 1.0)
    adapters = {id(p) for m in (model.enc_proj, model.dec_proj) for p in m.parameters()}
    assert adapters <= set(ids)                         # the projections are trained
    frozen = tiny_model(frozen=True)
    frozen.train()
    assert not frozen.tokenizer.training and frozen.recommender.training
    assert not any(p.requires_grad for p in frozen.tokenizer.parameters())
    cfg0 = parse_args([*TINY, "--unigrec.tokenizer_lr", "0"])
    ids0 = {id(p) for g in UniGRecMethod().param_groups(cfg0, frozen) for p in g["params"]}
    assert not ids0 & {id(p) for p in frozen.tokenizer.parameters()}


def test_cd_t_minimum_needs_the_teacher_when_its_side_is_fixed():
    """L_CD^T with the paper's trainable teacher projection is 0 when both projections output one constant (a
    minimum that carries nothing of the teacher); with the fixed least-squares teacher map no constant student
    side reaches it: the teacher's rows still differ from item to item."""
    def with_constant_student(model, c):
        with torch.no_grad():
            model.enc_proj.weight.zero_()
            model.enc_proj.bias.copy_(c)
            if model.tea_proj is not None:
                model.tea_proj.weight.zero_()
                model.tea_proj.bias.copy_(c)
        return float(run_model(model, tiny_batch(model)).cd_t)

    c = torch.randn(12)
    assert with_constant_student(tiny_model(teacher_map="trainable").eval(), c) < 1e-6
    fixed = tiny_model().eval()
    assert fixed.tea_proj is None and fixed.tea_map.shape == (5 + 1, 12)
    best = fixed.teacher_rows(torch.arange(10)).mean(0)       # the constant nearest to every teacher row
    assert with_constant_student(fixed, best) > 1e-3 and with_constant_student(fixed, c) > 1e-3
    # the map is least squares: its residual is orthogonal to the teacher's features
    T = torch.cat([fixed.teacher_emb, torch.ones(10, 1)], 1).double()
    resid = fixed.item_emb.double() - T @ fixed.tea_map.double()
    torch.testing.assert_close(T.t() @ resid, torch.zeros(6, 12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_ablations_drop_their_adapters():
    m = tiny_model(cd=(False, True))
    assert m.enc_proj is None and m.tea_proj is None and m.dec_proj is not None
    t = run_model(m, tiny_batch(m))
    assert float(t.cd_t) == 0.0 and float(t.cd_r.detach()) > 0


# --------------------------------------------------------------------------- a real run (1 rank)
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megarec.train_rec import parse_args
    from megarec.methods.training import run

    root = tmp_path_factory.mktemp("unigrec")
    inp = make_inputs(root)
    cfg = parse_args([*TINY, "--data.paths", str(inp["domain"]), "--unigrec.tokenizer", str(inp["tok"]),
                      "--unigrec.teacher", str(inp["teacher"]), "--train.run_dir", str(root / "run"),
                      "--train.epochs", "3", "--train.batch_size", "16", "--train.lr", "0.01",
                      "--train.warmup_steps", "0", "--train.eval_every", "2", "--train.log_every", "1"])
    return {"root": root, "run": root / "run", "result": run(cfg), **inp}


def test_run_logs_every_term_and_codebook_statistics(trained):
    run, m = trained["run"], trained["result"]
    assert m["epochs_run"] == 3 and m["test"]["count"] == 40 and len(m["valid_history"]) == 2
    steps = m["global_step"]
    for tag in ("loss/loss", "loss/rec", "loss/recon", "loss/cd_t", "loss/cd_r", "loss/uniformity"):
        assert len(tb_scalars(run / "tb", tag)) == steps, tag
    cb = run / "tb" / "codebook"
    spe = steps // 3
    # the initial codes, then a regeneration at the start of every later epoch (none after the last one:
    # its validation and export use the codes it trained on)
    assert sorted(tb_scalars(cb, "codebook/change_rate")) == [0, spe, 2 * spe]
    for tag in ("codebook/usage_l1", "codebook/perplexity_l2", "codebook/collision_rate"):
        assert len(tb_scalars(cb, tag)) == 3, tag
    assert any(v > 0 for v in tb_scalars(cb, "codebook/change_rate").values())   # lr 1e-3 moves the tokenizer


def test_exported_model_recommends_with_its_codes(trained):
    from megarec.engine.checkpoint import read_weights
    from megarec.methods.training import load_trained

    state, _ = read_weights(trained["run"] / "model" / "model.safetensors")
    assert {"item_codes", "codes_epoch", "tokenizer.quantizer.codebook_0"} <= set(state)
    t = load_trained(trained["run"])
    items, scores = t.recommender.recommend([np.array([0, 1, 2]), np.array([5])], 5)
    assert items.shape == (2, 5) and (items >= 0).all() and (items < 20).all()
    tok = t.recommender.item_tokens
    assert len({tuple(r) for r in tok.tolist()}) == len(tok)            # collision-free IDs


def test_missing_inputs_are_a_clear_error(tmp_path):
    from megarec.config import ConfigError
    from megarec.train_rec import parse_args
    from megarec.methods.training import run

    a = write_domain(tmp_path, "A", 10, 8)
    cfg = parse_args([*TINY, "--data.paths", str(a), "--train.run_dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="unigrec.tokenizer"):
        run(cfg)


@pytest.mark.slow
def test_pipeline_trains_teacher_and_soft_tokenizer_when_not_given(tmp_path):
    """``run_pipeline`` (quickstart, tools/reproduce.py): SASRec teacher -> its item embeddings,
    soft RQ-VAE on item text (stage 1), then UniGRec (stage 2)."""
    from megarec.tokenizer.rqvae import RQVAE
    from megarec.methods.training import run_pipeline

    a = write_domain(tmp_path, "Tiny", 30, 16, seed=4)
    out = tmp_path / "uni"
    result = run_pipeline("unigrec", [a], out, profile="tiny", progress=False, overrides=[("train.epochs", "1")])
    assert result["test"]["count"] == 30 and {"teacher", "tokenizer"} <= set(result)
    tok, tok_cfg, _ = RQVAE.load(out / "tokenizer")
    assert tok.soft and tok_cfg.rqvae.tau_min == pytest.approx(0.1)           # the tiny profile's stage 1
    assert (out / "teacher" / "sasrec_embeddings.safetensors").is_file()
    cfg = (out / "rec" / "config.yaml").read_text()
    assert "method: unigrec" in cfg and str((out / "tokenizer").resolve()) in cfg


def test_frozen_tokenizer_passes_the_distillation_gradient_to_the_projections():
    model = tiny_model(frozen=True)
    model.train()
    terms = run_model(model, tiny_batch(model))
    (terms.cd_t + terms.cd_r + terms.rec).backward()
    assert all(p.grad is None for p in model.tokenizer.parameters())
    for m in (model.enc_proj, model.dec_proj):
        assert float(m.weight.grad.abs().sum()) > 0


def test_without_distillation_no_teacher_is_needed(tmp_path):
    from megarec.data.readers import read_domain
    from megarec.methods.unigrec.plugin import UniGRecMethod
    from megarec.train_rec import parse_args

    inp = make_inputs(tmp_path)
    cfg = parse_args([*TINY, "--data.paths", str(inp["domain"]), "--unigrec.tokenizer", str(inp["tok"]),
                      "--unigrec.cd_t_weight", "0", "--unigrec.cd_r_weight", "0"])
    method = UniGRecMethod()
    data = method.prepare(cfg, [read_domain(inp["domain"])])
    model = method.build_model(cfg, data)
    assert data.teacher_emb is None and model.enc_proj is None and model.dec_proj is None
    assert model.tau == pytest.approx(0.1)                              # the tokenizer's tau_min
    assert data.vocab.codebook_sizes == [4, 4, 2048]                    # + the tiny profile's collision level


def test_batches_read_the_models_current_codes():
    """Targets follow regenerated codes at once: samples hold item indices, tokens come from the buffer."""
    model = tiny_model()
    table = CodeTable(model.vocab, model.item_codes.clone())
    table.model = model
    items = torch.tensor([[1, 2, -1]])
    samples = UniGRecSamples(items, np.array([2]), torch.tensor([3]), table)
    before = samples.batch(np.arange(1), "cpu")
    model.item_codes[3] = torch.tensor([3, 3, 2])
    after = samples.batch(np.arange(1), "cpu")
    assert not torch.equal(before["labels"], after["labels"])
    assert after["labels"].tolist() == [[int(o) + c for o, c in zip(model.vocab.offsets, (3, 3, 2))]]
    assert after["items"].tolist() == [[1, 2]] and after["counts"].tolist() == [2]
