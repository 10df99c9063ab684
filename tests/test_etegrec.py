"""ETEGRec (megarec.methods.etegrec.plugin*): each loss against a naive formula, the sign of the code
distributions, batches, the alternating schedule (what is frozen, gates, weights, codes), a
1-rank training run through the real trainer, and ``megarec recommend`` on its model.

The 2-rank ZeRO-3 kill-and-resume run is in test_etegrec_dist.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megarec.methods.etegrec.plugin import ETEGRecConfig, combine, epoch_phase, loss_weights, lr_gates
from megarec.methods.joint.samples import CodeTable, HistorySamples, code_stats
from megarec.methods.etegrec.model import (ETEGRecModel, first_occurrence, masked_mean, psa_loss,
                                           residual_code_probs, sia_loss, symmetric_kl)
from tests.test_train_rec import write_domain


# --------------------------------------------------------------------------- fixtures
def make_inputs(root: Path, n_users: int = 40, n_items: int = 20, dim: int = 16, seed: int = 5) -> dict:
    """A domain, random 'SASRec' item embeddings and a tiny RQ-VAE pre-trained on them."""
    from megarec.config import TokenizerConfig, load_config
    from megarec.data.domain import MultiDomain
    from megarec.data.embeddings import save_item_embeddings
    from megarec.data.readers import read_domain
    from megarec.tokenizer.train import train_rqvae

    a = write_domain(root, "A", n_users, n_items, seed=seed)
    keys = MultiDomain([read_domain(a)]).item_keys()
    emb = torch.randn(len(keys), dim, generator=torch.Generator().manual_seed(seed))
    save_item_embeddings(root / "emb.safetensors", emb, keys, source="test")
    cfg = load_config(TokenizerConfig, None, [("epochs", "20"), ("rqvae.hidden", "32"), ("rqvae.code_dim", "8"),
                                              ("rqvae.codebook_sizes", "4,4"), ("rqvae.dead_code_steps", "0"),
                                              ("kmeans_samples", "64"), ("device", "cpu")])
    model, _ = train_rqvae(emb, cfg, progress=False)
    model.save(root / "tok", cfg, {"input": "embeddings"})
    return {"domain": a, "emb": root / "emb.safetensors", "tok": root / "tok", "keys": keys}


def naive_probs(x: torch.Tensor, C: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return torch.softmax(-((x[:, None, :] - C[None]) ** 2).sum(-1) / tau, dim=-1)


def tiny_model(sizes=(4, 4), in_dim=12, code_dim=6, n_items=10, seed=0) -> ETEGRecModel:
    from megarec.config import RQVAEConfig
    from megarec.data.code_vocab import CodeVocab
    from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
    from megarec.tokenizer.rqvae import RQVAE

    torch.manual_seed(seed)
    tok = RQVAE(in_dim, RQVAEConfig(hidden=[16], code_dim=code_dim, codebook_sizes=list(sizes), dead_code_steps=0,
                                    dropout=0.1))
    rec = GenerativeRecommender(T5RecConfig(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2,
                                            d_kv=8), CodeVocab(list(sizes)))
    emb = torch.randn(n_items, in_dim)
    codes = torch.stack([torch.arange(n_items) % sizes[0], torch.arange(n_items) // sizes[0] % sizes[1]], 1)
    return ETEGRecModel(rec, tok, emb, codes)


def tiny_batch(model: ETEGRecModel, B: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = model.item_emb.shape[0]
    table = CodeTable(model.recommender.vocab, model.item_codes)
    items = torch.randint(0, n, (B, 3), generator=g)
    items[0, 2] = -1                                    # a shorter history
    samples = HistorySamples(items, (items >= 0).sum(1).numpy(), torch.randint(0, n, (B,), generator=g), table)
    samples.targets[1] = samples.targets[0]             # a repeated target
    return samples.batch(np.arange(B), "cpu")


# --------------------------------------------------------------------------- losses vs naive formulas
def test_code_distributions_put_the_nearest_code_first():
    """Eq. 6 with the paper's sign: P(k|v) = softmax(-||v - e_k||^2); the public code's logit = +d
    would make the farthest code the most probable."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 5, generator=g)
    books = [torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g) * 0.3]
    probs = residual_code_probs(x, books, tau=1.0)
    v = x
    for P, C in zip(probs, books):
        d = ((v[:, None] - C[None]) ** 2).sum(-1)
        torch.testing.assert_close(P, naive_probs(v, C), rtol=1e-5, atol=1e-6)
        assert torch.equal(P.argmax(1), d.argmin(1))          # nearest = most probable (Eq. 4)
        assert not torch.equal(P.argmax(1), d.argmax(1))
        v = v - C[d.argmin(1)]                                 # Eq. 5
    # temperature: sharper at lower tau, same argmax
    assert (residual_code_probs(x, books, 0.1)[0].max(1).values >= probs[0].max(1).values - 1e-6).all()


def test_residual_probs_gradients_flow_to_input_and_codebooks_unless_detached():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, requires_grad=True)
    C = [torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(2)]
    sum(p[:, 0].sum() for p in residual_code_probs(x, C)).backward()
    assert x.grad.abs().sum() > 0 and all(c.grad.abs().sum() > 0 for c in C)
    x.grad = None
    sum(p[:, 0].sum() for p in residual_code_probs(x, [c.detach() for c in C])).backward()
    assert x.grad.abs().sum() > 0


def test_symmetric_kl_and_sia_loss_match_kl_div():
    """Eq. 15: sum over levels of KL(P_z || P_zE) + KL(P_zE || P_z), mean over the batch."""
    g = torch.Generator().manual_seed(2)
    p = [torch.softmax(torch.randn(6, k, generator=g), 1) for k in (5, 3)]
    q = [torch.softmax(torch.randn(6, k, generator=g), 1) for k in (5, 3)]
    for a, b in zip(p, q):
        naive = F.kl_div(b.log(), a, reduction="none").sum(1) + F.kl_div(a.log(), b, reduction="none").sum(1)
        torch.testing.assert_close(symmetric_kl(a, b), naive)
    expected = sum((F.kl_div(b.log(), a, reduction="batchmean") + F.kl_div(a.log(), b, reduction="batchmean"))
                   for a, b in zip(p, q))
    torch.testing.assert_close(sia_loss(p, q), expected)
    assert float(sia_loss(p, p)) == pytest.approx(0.0, abs=1e-7)
    # zero probabilities (underflow) do not give nan
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert torch.isfinite(symmetric_kl(z, z)).all()


def test_psa_loss_is_the_two_way_infonce_of_eq16():
    g = torch.Generator().manual_seed(3)
    h, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    tau = 0.07
    S = F.normalize(h, dim=1) @ F.normalize(z, dim=1).t() / tau
    labels = torch.arange(7)
    naive = F.cross_entropy(S, labels) + F.cross_entropy(S.t(), labels)
    torch.testing.assert_close(psa_loss(h, z, tau), naive, rtol=1e-5, atol=1e-5)


def test_mean_pooling_ignores_padding_and_first_occurrence():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = masked_mean(h, mask)
    for i in range(3):
        torch.testing.assert_close(out[i], h[i, : int(mask[i].sum())].mean(0))
    h2 = h.clone()
    h2[mask == 0] = 1e6
    torch.testing.assert_close(masked_mean(h2, mask), out)
    assert first_occurrence(torch.tensor([3, 1, 3, 2, 1, 3])).tolist() == [True, True, False, True, False, False]


def test_batches_match_code_vocab_encoding():
    """Tokens looked up per batch = CodeVocab.encode_histories of the same histories (codes, EOS, PAD)."""
    from megarec.data.code_vocab import CodeVocab

    vocab = CodeVocab([4, 3, 2])
    codes = torch.stack([torch.arange(10) % 4, torch.arange(10) % 3, torch.arange(10) % 2], 1)
    table = CodeTable(vocab, codes)
    hist = [np.array([1, 2, 3]), np.array([5]), np.array([0, 9])]
    items = torch.full((3, 3), -1)
    for i, h in enumerate(hist):
        items[i, :len(h)] = torch.from_numpy(h)
    s = HistorySamples(items, np.array([3, 1, 2]), torch.tensor([4, 6, 7]), table)
    b = s.batch([0, 1, 2], "cpu")
    ids, mask = vocab.encode_histories(hist, vocab.item_tokens(codes.numpy()))
    assert torch.equal(b["input_ids"], ids) and torch.equal(b["attention_mask"], mask)
    assert torch.equal(b["labels"], torch.from_numpy(vocab.item_tokens(codes.numpy())[[4, 6, 7]]))
    assert s.lengths.tolist() == [10, 4, 7]
    table.codes = torch.flip(codes, [0])          # regenerated codes apply to the next batch at once
    b2 = s.batch([1], "cpu")
    assert torch.equal(b2["labels"][0], torch.from_numpy(vocab.item_tokens(codes.numpy()[[9 - 6]]))[0])


# --------------------------------------------------------------------------- schedule
def test_alternating_schedule_phases_gates_and_weights():
    s = ETEGRecConfig(cycle=4, align_warmup_epochs=5, finetune_epochs=2, sia_weight=0.3, psa_weight=0.2)
    names = [epoch_phase(e, s, 12).name for e in range(12)]
    assert names == ["tokenizer", "recommender", "recommender", "recommender"] * 2 + ["tokenizer", "recommender",
                                                                                     "finetune", "finetune"]
    tok, rec = epoch_phase(4, s, 12), epoch_phase(5, s, 12)
    assert tok.train_tokenizer and not tok.train_recommender and tok.regenerate and not tok.align
    assert rec.train_recommender and not rec.train_tokenizer and not rec.regenerate and rec.align
    assert loss_weights(tok, s) == {"rec": 0.0, "sq": 1.0, "sia": 0.0, "psa": 0.0}        # Eq. 17, warm-up
    assert loss_weights(epoch_phase(8, s, 12), s) == {"rec": 0.0, "sq": 1.0, "sia": 0.3, "psa": 0.2}   # Eq. 17
    assert loss_weights(rec, s) == {"rec": 1.0, "sq": 0.0, "sia": 0.3, "psa": 0.2}        # Eq. 18
    assert loss_weights(epoch_phase(11, s, 12), s) == {"rec": 1.0, "sq": 0.0, "sia": 0.0, "psa": 0.0}
    assert lr_gates(tok) == {"decay": 0.0, "no_decay": 0.0, "tokenizer.": 1.0}
    assert lr_gates(rec) == {"decay": 1.0, "no_decay": 1.0, "tokenizer.": 0.0}
    joint = ETEGRecConfig(alternate=False, align_warmup_epochs=0)                  # the 'w/o AT' ablation
    ph = epoch_phase(3, joint, 10)
    assert ph.train_tokenizer and ph.train_recommender and ph.regenerate
    assert loss_weights(ph, joint) == {"rec": 1.0, "sq": 1.0, "sia": 3e-4, "psa": 1e-4}
    from megarec.engine.deepspeed_setup import gate_factor

    for name in ("decay", "no_decay"):
        assert gate_factor(name, lr_gates(tok)) == 0.0 and gate_factor(name, lr_gates(rec)) == 1.0
    for name in ("tokenizer.decay", "tokenizer.no_decay"):
        assert gate_factor(name, lr_gates(tok)) == 1.0 and gate_factor(name, lr_gates(rec)) == 0.0


def test_frozen_side_gets_no_gradient_and_stays_in_eval_mode():
    model = tiny_model()
    batch = tiny_batch(model)
    w = {"rec": 1.0, "sq": 1.0, "sia": 1.0, "psa": 1.0}
    tok_params = list(model.tokenizer.parameters())
    rec_params = [p for m in model.recommender_modules() for p in m.parameters()]
    for frozen_tok in (True, False):
        model.zero_grad(set_to_none=True)
        model.set_frozen(tokenizer=frozen_tok, recommender=not frozen_tok)
        model.train()
        assert model.tokenizer.training is not frozen_tok
        assert all(m.training is frozen_tok for m in model.recommender_modules())
        out = combine(model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["targets"]), w)
        assert set(out) == {"loss", "rec", "sq", "recon", "sia", "psa"}
        out["loss"].backward()
        frozen, trained = (tok_params, rec_params) if frozen_tok else (rec_params, tok_params)
        assert all(p.grad is None for p in frozen)
        assert sum(float(p.grad.abs().sum()) for p in trained if p.grad is not None) > 0
    # joint training ('w/o AT'): both sides get gradients
    model.zero_grad(set_to_none=True)
    model.set_frozen(tokenizer=False, recommender=False)
    combine(model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["targets"]), w)["loss"].backward()
    assert all(p.grad is not None for p in model.sia_proj.parameters())
    assert model.tokenizer.quantizer.codebook_0.grad is not None and model.tokenizer.encoder[0].weight.grad is not None
    # in tokenizer epochs the codebooks learn from L_SIA too (gradient through P_zE), not only L_SQ
    model.zero_grad(set_to_none=True)
    model.set_frozen(tokenizer=False, recommender=True)
    out = combine(model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["targets"]),
                  {"rec": 0.0, "sq": 0.0, "sia": 1.0, "psa": 0.0})
    out["loss"].backward()
    assert model.tokenizer.quantizer.codebook_0.grad.abs().sum() > 0


def test_code_stats_change_rate():
    old = torch.tensor([[0, 1, 0], [1, 1, 0], [2, 0, 0], [3, 0, 0]])
    new = torch.tensor([[0, 1, 0], [1, 2, 0], [2, 0, 1], [3, 0, 0]])
    stats = {"collision_rate_before": 0.5, "levels_before": [{}, {}]}
    out = code_stats(old, new, [4, 4, 2], stats)
    assert out["change_rate"] == 0.5 and out["change_rate_l2"] == 0.25 and out["change_rate_l1"] == 0.0
    assert out["collision_rate"] == 0.5 and out["usage_l1"] == 1.0 and "perplexity_l2" in out


def test_sq_reduction_mean_divides_each_term_by_its_width():
    """``sq_reduction mean``: L_RECON / d_z and L_RQ / code_dim of the summed terms (same weights, same batch)."""
    model = tiny_model(in_dim=12, code_dim=6).eval()
    b = tiny_batch(model)
    with torch.no_grad():
        summed = model(b["input_ids"], b["attention_mask"], b["labels"], b["targets"])
        model.sq_reduction = "mean"
        meaned = model(b["input_ids"], b["attention_mask"], b["labels"], b["targets"])
    torch.testing.assert_close(meaned.recon, summed.recon / 12)
    torch.testing.assert_close(meaned.sq - meaned.recon, (summed.sq - summed.recon) / 6)
    assert ETEGRecConfig().sq_reduction == "mean"
    with pytest.raises(ValueError, match="sq_reduction"):
        tiny_model().__class__(model.recommender, model.tokenizer, model.item_emb, model.item_codes,
                               sq_reduction="max")


def test_regenerated_codes_keep_each_items_dedup_token():
    """A regeneration from an unchanged tokenizer returns the previous codes exactly, even where their dedup
    tokens are not in item order (they came from an earlier regeneration); without the previous codes the
    same assignment renumbers them."""
    from megarec.methods.joint.samples import item_codes

    model = tiny_model(sizes=(2, 2), n_items=24)
    s = ETEGRecConfig(collision_codes=24)
    keys = [f"D/{i}" for i in range(24)]
    first, _ = item_codes(model.tokenizer, model.item_emb, keys, s)
    prefix = first[:, :2]
    shuffled = first.clone()
    for g in torch.unique(prefix, dim=0):           # reverse the dedup tokens inside every group
        members = torch.nonzero((prefix == g).all(1)).flatten()
        shuffled[members, 2] = first[members.flip(0), 2]
    assert not torch.equal(shuffled, first)
    again, _ = item_codes(model.tokenizer, model.item_emb, keys, s, previous=shuffled)
    assert torch.equal(again, shuffled)
    assert torch.equal(item_codes(model.tokenizer, model.item_emb, keys, s)[0], first)


# --------------------------------------------------------------------------- through the trainer
TINY = ["--profile", "tiny", "--method", "etegrec", "--train.progress", "false", "--train.log_every", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 tiny epochs (tokenizer, recommender, tokenizer, recommender) through methods.training.run with
    the epoch hooks wrapped to snapshot the model at every epoch start and end."""
    from megarec.methods.etegrec.plugin import ETEGRecMethod
    from megarec.train_rec import parse_args
    from megarec.methods.training import run

    root = tmp_path_factory.mktemp("etegrec")
    inp = make_inputs(root)
    snaps: list[dict] = []
    original = ETEGRecMethod.make_task

    def snapshot(model, when, epoch, gates):
        snaps.append({"when": when, "epoch": epoch, "gates": dict(gates),
                      "tok": {k: v.detach().clone() for k, v in model.tokenizer.state_dict().items()},
                      "rec": {k: v.detach().clone() for m in model.recommender_modules()
                              for k, v in m.state_dict().items()},
                      "rec_proj": {k: v.detach().clone() for k, v in model.psa_proj.state_dict().items()},
                      "codes": model.item_codes.clone(), "codes_epoch": int(model.codes_epoch),
                      "tok_training": model.tokenizer.training,
                      "rec_training": model.recommender.training})

    def make_task(self, cfg, data, device, metadata):
        task = original(cfg, data, device, metadata)   # a static step of the plug-in
        start, end = task.on_epoch_start, task.on_epoch_end

        def on_start(epoch):
            start(epoch)
            snapshot(data.model, "start", epoch, task.lr_gates)

        def on_end(epoch):
            snapshot(data.model, "end", epoch, task.lr_gates)
            end(epoch)
            snapshot(data.model, "regen", epoch, task.lr_gates)

        task.on_epoch_start, task.on_epoch_end = on_start, on_end
        return task

    mp = pytest.MonkeyPatch()
    mp.setattr(ETEGRecMethod, "make_task", make_task)
    try:
        cfg = parse_args([*TINY, "--data.paths", str(inp["domain"]), "--etegrec.embeddings", str(inp["emb"]),
                          "--etegrec.tokenizer", str(inp["tok"]), "--train.run_dir", str(root / "run"),
                          "--train.epochs", "4", "--train.batch_size", "16", "--train.lr", "0.01",
                          "--train.warmup_steps", "0", "--train.eval_every", "2"])
        result = run(cfg)
    finally:
        mp.undo()
    return {"root": root, "run": root / "run", "snaps": snaps, "result": result, **inp}


def _snap(snaps, when, epoch):
    return next(s for s in snaps if s["when"] == when and s["epoch"] == epoch)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_alternating_epochs_freeze_the_right_side(trained):
    snaps = trained["snaps"]
    for epoch in (1, 3):        # recommender epochs: tokenizer frozen, codes fixed
        s, e = _snap(snaps, "start", epoch), _snap(snaps, "end", epoch)
        assert s["gates"] == {"decay": 1.0, "no_decay": 1.0, "tokenizer.": 0.0}
        assert not s["tok_training"] and s["rec_training"]
        assert _same(s["tok"], e["tok"]), "the frozen tokenizer moved in a recommender epoch"
        assert torch.equal(s["codes"], e["codes"]) and torch.equal(e["codes"], _snap(snaps, "regen", epoch)["codes"])
        assert not _same(s["rec"], e["rec"])
    for epoch in (0, 2):        # tokenizer epochs: recommender frozen, codes regenerated at the next start
        s, e, r = _snap(snaps, "start", epoch), _snap(snaps, "end", epoch), _snap(snaps, "regen", epoch)
        assert s["gates"] == {"decay": 0.0, "no_decay": 0.0, "tokenizer.": 1.0}
        assert s["tok_training"] and not s["rec_training"]
        assert _same(s["rec"], e["rec"]), "the frozen recommender moved in a tokenizer epoch"
        assert not _same(s["tok"], e["tok"])
        assert torch.equal(s["codes"], e["codes"])             # codes fixed during the epoch
        # validation after the epoch sees the codes it trained on; the next epoch starts on new ones
        assert torch.equal(r["codes"], e["codes"]) and r["codes_epoch"] == e["codes_epoch"] == s["codes_epoch"]
        assert _snap(snaps, "start", epoch + 1)["codes_epoch"] == epoch + 1


def test_run_logs_every_term_and_codebook_statistics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained["run"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "loss/rec", "loss/sq", "loss/recon", "loss/sia", "loss/psa", "eval/ndcg@10"} <= tags
    # one lr per part, gates included: the recommender's and the tokenizer's are never both on
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    lr_tok = {e.step: e.value for e in acc.Scalars("train/lr_tokenizer")}
    assert lr.keys() == lr_tok.keys() and not any(lr[k] > 0 and lr_tok[k] > 0 for k in lr)
    assert max(lr.values()) > 0 and max(lr_tok.values()) > 0
    cb = EventAccumulator(str(trained["run"] / "tb" / "codebook"))
    cb.Reload()
    ctags = set(cb.Tags()["scalars"])
    assert {"codebook/change_rate", "codebook/collision_rate", "codebook/usage_l1", "codebook/perplexity_l2"} <= ctags
    assert len(cb.Scalars("codebook/change_rate")) == 2          # after each tokenizer epoch
    m = json.loads((trained["run"] / "metrics.json").read_text())
    assert m["epochs_run"] == 4 and m["test"]["count"] == 40


def test_exported_model_recommends_with_its_codes(trained):
    """The model folder holds the selected epoch's codes; `megarec recommend` decodes with them."""
    from safetensors.torch import load_file

    from megarec.data.code_vocab import CodeVocab
    from megarec.methods.training import load_trained

    w = load_file(str(trained["run"] / "model" / "model.safetensors"))
    assert {"item_codes", "item_emb", "codes_epoch"} <= set(w)
    codes = w["item_codes"]
    assert codes.shape == (20, 3) and len({tuple(c) for c in codes.tolist()}) == 20      # collision-free (dedup)
    t = load_trained(trained["run"])
    items, scores = t.recommender.recommend([np.array([1, 2, 3]), np.array([7])], 5)
    assert items.shape == (2, 5) and (items >= 0).all() and (scores[:, :-1] >= scores[:, 1:]).all()
    vocab = CodeVocab([4, 4, 2048])                    # the tiny RQ-VAE's levels + the tiny profile's collision level
    assert np.array_equal(t.recommender.item_tokens, vocab.item_tokens(codes.numpy()))
    # 'w/o ETE': the final codes as a codes file that TIGER reads
    from megarec.data.code_sequences import CodeSequenceData
    from megarec.data.codes import CodesFile
    from megarec.data.domain import MultiDomain
    from megarec.methods.etegrec.plugin import trained_codes

    path = trained["root"] / "final_codes.safetensors"
    trained_codes(t.cfg, w, MultiDomain(t.domains)).save(path)
    cf = CodesFile.load(path)
    assert cf.dedup_level and cf.codebook_sizes == [4, 4, 2048] and np.array_equal(cf.codes, codes.numpy())
    assert CodeSequenceData(t.domains, cf).vocab.vocab_size == vocab.vocab_size


def test_resumed_epoch_start_restores_the_schedule(trained):
    """on_epoch_start of a fresh schedule (a resumed run) derives gates, frozen side and weights
    from the epoch number, and regenerates codes only when the checkpoint predates them."""
    from megarec.methods import get_method
    from megarec.train_rec import parse_args

    cfg = parse_args([*TINY, "--data.paths", str(trained["domain"]), "--etegrec.embeddings", str(trained["emb"]),
                      "--etegrec.tokenizer", str(trained["tok"]), "--train.epochs", "4", "--train.run_dir",
                      str(trained["root"] / "unused")])
    method = get_method("etegrec")
    data = method.prepare(cfg, [__import__("megarec.data.readers", fromlist=["read_domain"]).read_domain(
        trained["domain"])])
    model = method.build_model(cfg, data)
    task = method.make_task(cfg, data, torch.device("cpu"), {})
    sched = task.schedule
    before = model.item_codes.clone()
    model.codes_epoch.fill_(1)                     # checkpoint written after the epoch-0 regeneration
    task.on_epoch_start(1)
    assert torch.equal(model.item_codes, before)   # nothing regenerated
    assert task.lr_gates == {"decay": 1.0, "no_decay": 1.0, "tokenizer.": 0.0}
    assert model.frozen == {"tokenizer": True, "recommender": False}
    assert sched.weights["rec"] == 1.0 and sched.weights["sq"] == 0.0
    with torch.no_grad():                          # a tokenizer that moved, codes stale (epoch-end save missing)
        model.tokenizer.quantizer.codebook_1.mul_(-1.0)
    model.codes_epoch.fill_(0)
    task.on_epoch_start(1)
    assert int(model.codes_epoch) == 1 and not torch.equal(model.item_codes, before)


def test_missing_inputs_are_a_clear_error(tmp_path):
    from megarec.train_rec import main

    a = write_domain(tmp_path, "A", 10, 8)
    rc = main([*TINY, "--data.paths", str(a), "--train.run_dir", str(tmp_path / "run")])
    assert rc == 2


def test_pipeline_trains_the_teacher_and_the_tokenizer(tmp_path):
    """Given only data, the pipeline trains SASRec, exports its item embeddings, pre-trains the
    RQ-VAE on them, then trains ETEGRec from both (and reuses them when run again)."""
    from megarec.methods.training import run_pipeline

    a = write_domain(tmp_path, "A", 30, 15, seed=3)
    out = tmp_path / "pipe"
    res = run_pipeline("etegrec", [a], out, profile="tiny", overrides=[("train.epochs", "2")], progress=False)
    assert (out / "teacher" / "sasrec_embeddings.safetensors").is_file()
    assert (out / "tokenizer" / "model.safetensors").is_file()
    assert res["test"]["count"] == 30 and "teacher" in res and "tokenizer" in res
    saved = (out / "rec" / "config.yaml").read_text()
    assert "sasrec_embeddings.safetensors" in saved and str(out / "tokenizer") in saved
    # the stages are reused with the same settings; a teacher made with others is never overwritten
    from megarec.config import ConfigError
    from megarec.methods.etegrec.plugin import pretrain_tokenizer
    from megarec.methods.joint.stages import teacher_embeddings
    from megarec.methods.profiles import flatten, load_profile
    from megarec.methods.training import pipeline_config, read_domains

    cfg = pipeline_config("etegrec", [a], out, "tiny", progress=False)
    stages = {k: flatten(v) for k, v in load_profile("etegrec", "tiny").stages.items()}
    path, info = teacher_embeddings(cfg, out / "teacher", stages["teacher"], progress=False)
    assert info == {"reused": str(path)}
    cfg.etegrec.embeddings = str(path)
    before = (out / "tokenizer" / "model.safetensors").stat().st_mtime_ns
    pretrain_tokenizer(cfg, read_domains(cfg.data), out / "tokenizer", stages["tokenizer"], progress=False)
    assert (out / "tokenizer" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="other settings"):
        teacher_embeddings(cfg, out / "teacher", stages["teacher"] + [("sasrec.hidden", 8)], progress=False)


def test_bf16_freezes_fp32_masters_and_exports_them(trained, tmp_path):
    """DeepSpeed bf16 (ZeRO 1, BF16_Optimizer, on the CPU accelerator): the recommender's fp32 masters
    do not move in a tokenizer epoch, the tokenizer runs in bf16 on the fp32 item embeddings, and the
    exported model holds the fp32 masters of both sides."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from megarec.train_rec import main

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    (tmp_path / "bf16.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    rc = main([*TINY, "--data.paths", str(trained["domain"]), "--etegrec.embeddings", str(trained["emb"]),
               "--etegrec.tokenizer", str(trained["tok"]), "--deepspeed", str(tmp_path / "bf16.json"),
               "--train.run_dir", str(run), "--train.epochs", "3", "--train.batch_size", "16",
               "--train.eval_every", "2", "--train.patience", "0", "--train.keep_checkpoints", "3"])
    assert rc == 0
    ckpts = sorted((run / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:]))
    assert len(ckpts) == 3                                     # the ends of epochs 0, 1 and 2
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ends = [get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=p.name) for p in ckpts]
    after_rec, after_tok = ends[1], ends[2]                    # epoch 1: recommender, epoch 2: tokenizer
    rec = [k for k in after_rec if not k.startswith("tokenizer.") and after_rec[k].is_floating_point()
           and k != "item_emb"]
    assert all(torch.equal(after_rec[k], after_tok[k]) for k in rec)
    assert any(not torch.equal(after_rec[k], after_tok[k]) for k in after_rec if k.startswith("tokenizer.encoder"))
    exported = load_file(str(run / "model" / "model.safetensors"))
    best = json.loads((run / "metrics.json").read_text())["best_epoch"]
    assert best in (1, 2)      # evaluated after epochs 1 and 2: the frozen side's master moved in an earlier epoch
    masters = ends[best]
    for k in masters:
        if masters[k].is_floating_point() and k != "item_emb":
            assert torch.equal(exported[k].float(), masters[k].float()), k
