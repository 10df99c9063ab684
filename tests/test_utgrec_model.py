"""UTGRec tokenizer parts: content encoders (tiny Qwen2-VL from disk, real MiniLM), decoders, diffusion loss,
losses of Eqs. 8-13 against naive formulas, dead-code restarts of the tree codebooks, warm-up, fine-tuning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.utgrec_fixtures import tiny_models


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("utgrec_models"))


@pytest.fixture(scope="module")
def qwen(paths):
    from megarec.methods.utgrec.content_encoder import QwenVLEncoder

    torch.manual_seed(0)
    return QwenVLEncoder(str(paths[0]), 3, max_text_tokens=16)


def _images(n: int, size: int = 28) -> list[torch.Tensor]:
    from megarec.data.images import placeholder_image, resize_uint8

    return [resize_uint8(placeholder_image(f"item{i}", 64), size) for i in range(n)]


TEXTS = ["Kreg pocket hole screws steel", "paper patty 1000 pack", "glass lab beaker", "blue tape"]


# ------------------------------------------------------------------------------------------ encoders
def test_qwen_encoder_loads_from_disk_with_lora_and_code_rows(qwen):
    base = qwen.model.get_base_model()
    assert type(base).__name__ == "Qwen2VLModel" and not hasattr(base, "lm_head")   # no LM head, no logits
    assert qwen.tokenizer.convert_ids_to_tokens(qwen.code_ids) == ["<CODE_1>", "<CODE_2>", "<CODE_3>"]
    trainable = [n for n, p in qwen.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert all(".visual." not in n for n in trainable)                     # vision tower frozen, no LoRA there
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    delta = [p for n, p in qwen.named_parameters() if "trainable_tokens" in n]
    assert len(delta) == 1 and delta[0].shape[0] == 3                      # only the L code rows are trained
    emb = [p for n, p in qwen.named_parameters() if n.endswith("embed_tokens.token_adapter.base_layer.weight")
           or n.endswith("embed_tokens.weight")]
    assert emb and not any(p.requires_grad for p in emb)                   # the 151k-row table stays frozen


def test_a_local_model_folder_is_loaded_without_hub_lookups(paths, monkeypatch):
    """Every rank of a SLURM job loads the encoder: from a local folder with ``local_files_only`` (no hub
    request from any rank); a hub id is left to the hub."""
    import transformers

    from megarec.methods.utgrec.content_encoder import QwenVLEncoder, local_only

    assert local_only(str(paths[0])) == {"local_files_only": True} and local_only("Qwen/Qwen2-VL-2B-Instruct") == {}
    seen = []
    orig = transformers.Qwen2VLModel.from_pretrained.__func__

    def spy(cls, path, *a, **kw):
        seen.append(kw.get("local_files_only"))
        return orig(cls, path, *a, **kw)

    monkeypatch.setattr(transformers.Qwen2VLModel, "from_pretrained", classmethod(spy))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing listens: a hub request would fail
    QwenVLEncoder(str(paths[0]), 3, max_text_tokens=16)
    assert seen == [True]


def test_qwen_encoder_prompts_and_code_states(qwen):
    ims = _images(4)
    images = [ims[0], None, ims[2], None]
    enc = qwen.prepare(TEXTS, images)
    assert enc["image_grid_thw"].shape[0] == 2
    ids = enc["input_ids"]
    image_tok = qwen.image_token_id
    assert [(r == image_tok).sum().item() > 0 for r in ids] == [True, False, True, False]
    for cid in qwen.code_ids:
        assert ((ids == cid).sum(1) == 1).all()
    qwen.eval()
    h = qwen(**enc)
    assert h.shape == (4, 3, qwen.hidden_size) and torch.isfinite(h).all()
    # H is the last hidden state at the code positions (Eq. 2)
    hidden = qwen.model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
                        image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=(ids == image_tok).int()).last_hidden_state
    pos = (ids == qwen.code_ids[1]).nonzero()
    torch.testing.assert_close(h[:, 1], hidden[pos[:, 0], pos[:, 1]])
    qwen.train()


def test_qwen_encoder_runs_vision_tower_without_images(qwen):
    """ZeRO-3: a text-only batch still calls the vision tower (dummy image, weight 0)."""
    calls = []
    hook = qwen._visual().register_forward_hook(lambda *a: calls.append(1))
    try:
        h = qwen(**qwen.prepare(TEXTS[:2], [None, None]))
    finally:
        hook.remove()
    assert calls and h.shape[:2] == (2, 3)
    h.sum().backward()
    lora_b = [p.grad for n, p in qwen.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_b)
    qwen.zero_grad()


def test_qwen_encoder_calls_modules_in_the_same_order_with_and_without_images(qwen):
    """ZeRO-3 gathers parameters module by module in call order: a rank whose batch has images and a rank whose
    batch has none must call the vision tower, the embeddings and the layers in the same order."""
    base = qwen.model.get_base_model()
    watched = {"visual": base.visual, "embed": base.language_model.embed_tokens, "layer0": base.language_model.layers[0]}

    def order(images):
        calls, hooks = [], [m.register_forward_pre_hook(lambda *a, n=n: calls.append(n)) for n, m in watched.items()]
        try:
            qwen(**qwen.prepare(TEXTS[:2], images))
        finally:
            for h in hooks:
                h.remove()
        return calls

    ims = _images(2)
    assert order([None, None]) == order([ims[0], None]) == order(ims) == ["visual", "embed", "layer0"]


def test_text_encoder_backend_with_real_minilm():
    from megarec.methods.utgrec.content_encoder import TextEncoder

    enc = TextEncoder("", 3, max_text_tokens=16)
    x = enc.prepare(TEXTS, None)
    h = enc(**x)
    assert h.shape == (4, 3, 384) and enc.hidden_size == 384
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable) and len(trainable) > 10
    assert all("pooler" not in n for n in trainable)
    # no dropout inside the frozen backbone (Qwen2-VL has none): training mode gives the eval-mode states
    assert all(m.p == 0 for n, m in enc.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_" not in n)
    enc.train()
    torch.testing.assert_close(enc(**x), h, rtol=1e-5, atol=1e-5)


def test_bad_encoder_settings_are_clear(paths):
    from megarec.data.domain import DataError
    from megarec.methods.utgrec.content_encoder import build_content_encoder

    with pytest.raises(DataError, match="encoder.path"):
        build_content_encoder("qwen2vl", "", 3)
    with pytest.raises(DataError, match="matches no linear layer"):
        build_content_encoder("qwen2vl", str(paths[0]), 3, lora_targets=r"nothing\.here")
    with pytest.raises(DataError, match="backend"):
        build_content_encoder("clip", "x", 3)


# ------------------------------------------------------------------------------------------ decoders
def test_text_nll_matches_naive_formula():
    from megarec.methods.utgrec.text_decoder import text_nll

    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.zeros(3)
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                want[b] -= math.log(torch.softmax(logits[b, t], -1)[targets[b, t]])
    torch.testing.assert_close(text_nll(logits, targets, mask), want)


def test_text_decoder_ignores_padding_and_sees_only_h_hat():
    from megarec.methods.utgrec.text_decoder import MaskedTextDecoder

    torch.manual_seed(2)
    dec = MaskedTextDecoder(16, 30, 12, 3, heads=2).eval()
    h = torch.randn(2, 3, 16)
    short = dec(h, torch.ones(2, 4, dtype=torch.bool))
    padded = dec(h, torch.tensor([[1] * 4 + [0] * 4] * 2, dtype=torch.bool))
    torch.testing.assert_close(padded[:, :4], short, rtol=1e-5, atol=1e-5)
    other = dec(torch.randn(2, 3, 16), torch.ones(2, 4, dtype=torch.bool))
    assert not torch.allclose(other, short)
    with pytest.raises(ValueError, match="max_tokens"):
        dec(h, torch.ones(2, 13, dtype=torch.bool))


def test_text_decoder_prior_is_the_smoothed_unigram_distribution():
    from megarec.methods.utgrec.text_decoder import MaskedTextDecoder

    dec = MaskedTextDecoder(16, 6, 12, 3, heads=2)
    ids = torch.tensor([[0, 2, 2], [5, 2, 0]])
    dec.init_prior(ids)
    counts = torch.tensor([2, 0, 3, 0, 0, 1], dtype=torch.float64) + 0.1
    torch.testing.assert_close(torch.softmax(dec.head.bias.double(), 0), counts / counts.sum())
    with torch.no_grad():
        dec.head.weight.zero_()     # a decoder that ignores H_hat predicts exactly the prior
    logits = dec(torch.randn(2, 3, 16), torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(torch.log_softmax(logits, -1)[0, 0].double(), (counts / counts.sum()).log(), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.init_prior(torch.tensor([6]))


def test_model_text_prior_comes_from_the_catalogue_texts():
    from megarec.methods.utgrec.content_encoder import TextEncoder
    from megarec.methods.utgrec.model import UTGRecModel

    enc = TextEncoder("", 3, max_text_tokens=16)
    model = UTGRecModel(enc, root_size=4, leaf_size=4, code_dim=8, adapter_hidden=16, decoder_dim=16,
                        decoder_heads=2, max_text_tokens=5)
    model.init_text_prior(TEXTS)
    ids, mask = enc.text_targets(TEXTS, 5)
    top = torch.bincount(ids[mask], minlength=enc.vocab_size).argmax()
    assert model.text_decoder.head.bias.argmax() == top


def test_text_decoder_nll_only_projects_real_tokens():
    from megarec.methods.utgrec.text_decoder import MaskedTextDecoder, text_nll

    torch.manual_seed(9)
    dec = MaskedTextDecoder(16, 30, 12, 3, heads=2).eval()
    h, targets = torch.randn(3, 3, 16), torch.randint(0, 30, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2], dtype=torch.bool)
    torch.testing.assert_close(dec.nll(h, targets, mask), text_nll(dec(h, mask), targets, mask))


def test_diffusion_loss_matches_naive_formula():
    from megarec.methods.utgrec.image_decoder import DiffusionHead

    torch.manual_seed(3)
    head = DiffusionHead(6, 8, width=16, depth=2, samples_per_token=3)
    for p in head.parameters():   # zero-initialised output layers would make the check trivial
        torch.nn.init.normal_(p, std=0.2)
    cond, x0 = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    has = torch.tensor([True, False])
    torch.manual_seed(7)
    out = head(cond, x0, has)
    torch.manual_seed(7)
    n = 2 * 3 * 4
    t = torch.randint(0, 1000, (n,))
    noise = torch.randn(n, 6)
    # cosine schedule (Nichol & Dhariwal): alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2), betas clipped at 0.999
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    abar = torch.cumprod(1 - betas, 0)[t][:, None]
    xs = x0[:, None].expand(2, 3, 4, 6).reshape(-1, 6)
    cs = cond[:, None].expand(2, 3, 4, 8).reshape(-1, 8)
    xt = abar.sqrt() * xs + (1 - abar).sqrt() * noise
    err = ((head.net(xt, t, cs) - noise) ** 2).mean(-1).view(2, 12).mean(1)
    torch.testing.assert_close(out.per_item, err * has, rtol=1e-4, atol=1e-5)


def test_no_image_batch_gives_zero_not_nan():
    from megarec.methods.utgrec.tokenizer import reconstruction_loss
    from megarec.methods.utgrec.image_decoder import ImageDecoder

    dec = ImageDecoder(16, 4, 6, 3, heads=2, width=16, depth=1)
    h = torch.randn(3, 3, 16, requires_grad=True)
    out = dec(h, torch.zeros(3, 4, 6), torch.zeros(3, dtype=torch.bool))
    total, lt, lv = reconstruction_loss(torch.ones(3), torch.ones(3), out.per_item, out.has_image, alpha=3.0)
    assert lv.item() == 0.0 and total.item() == pytest.approx(1.0)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters() if p.grad is not None)


def test_image_latents_from_tiny_vae(paths):
    from megarec.methods.utgrec.image_decoder import ImageLatents

    lat = ImageLatents(str(paths[1]), image_size=16, patch=2)
    z = lat(torch.stack(_images(2)))
    assert z.shape == (2, lat.num_tokens, lat.token_dim) == (2, 16, 16)
    assert not any(p.requires_grad for p in lat.parameters())
    with pytest.raises(ValueError, match="multiple"):
        ImageLatents(str(paths[1]), image_size=18, patch=2)


# ------------------------------------------------------------------------------------------ losses
def test_alignment_loss_matches_naive_formula():
    from megarec.methods.utgrec.tokenizer import alignment_loss

    torch.manual_seed(4)
    h, hp = torch.randn(5, 3, 7), torch.randn(5, 3, 7)
    want = 0.0
    for l in range(3):
        for i in range(5):
            sims = torch.tensor([F.cosine_similarity(h[i, l], hp[j, l], dim=0) / 0.1 for j in range(5)])
            want += -(sims[i] - torch.logsumexp(sims, 0)) / 5
    assert alignment_loss(h, hp, 0.1).item() == pytest.approx(float(want), rel=1e-5)


def _fake_output(B=3, L=3):
    from megarec.methods.utgrec.image_decoder import DiffusionOutput
    from megarec.tokenizer.tree import TreeOutput
    from megarec.methods.utgrec.model import UTGRecOutput

    torch.manual_seed(5)
    tree = TreeOutput(torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, 4), torch.zeros(B, L, 4),
                      torch.zeros(B, L, 4), torch.tensor(0.5))
    has = torch.tensor([True, False, True, False, False, True])
    return UTGRecOutput(torch.randn(2 * B, L, 8), tree, torch.tensor([4., 6., 2., 3., 3., 9.]),
                        torch.tensor([2, 3, 1, 3, 1, 2]), DiffusionOutput(torch.tensor([.2, 0., .4, 0., 0., .6]), has))


def test_tokenizer_loss_is_eq13_with_paper_defaults():
    from megarec.methods.utgrec.tokenizer import LossConfig, alignment_loss, tokenizer_loss

    cfg = LossConfig()
    assert (cfg.lambda_code, cfg.alpha, cfg.mu, cfg.eta, cfg.tau) == (200.0, 3.0, 0.01, 0.03, 0.1)
    out = _fake_output()
    parts = tokenizer_loss(out, cfg)
    raw = 12 / 6 + 3 * (0.6 / 2)           # anchors: NLL per token + alpha * diffusion per image
    re = 15 / 6 + 3 * (0.6 / 1)            # positives reconstructed from the anchors' H_hat
    ali = alignment_loss(out.h[:3], out.h[3:], 0.1).item()
    assert parts["raw"].item() == pytest.approx(raw) and parts["re"].item() == pytest.approx(re)
    assert parts["loss"].item() == pytest.approx(raw + 200 * 0.5 + 0.01 * ali + 0.03 * re, rel=1e-6)
    warm = tokenizer_loss(out, cfg, quantize=False)          # warm-up: L_Code weighted 0
    assert warm["loss"].item() == pytest.approx(raw + 0.01 * ali + 0.03 * re, rel=1e-6)


def test_warmup_schedule_counts_optimizer_steps():
    from megarec.methods.utgrec.tokenizer import quantizing

    assert [quantizing(s, 3) for s in range(5)] == [False, False, False, True, True]
    assert quantizing(0, 0)


# ------------------------------------------------------------------------------------------ codebooks
def test_tree_dead_code_restart_reseeds_unused_rows():
    from megarec.tokenizer.tree import TreeCodebooks, prefix_residual

    torch.manual_seed(6)
    tree = TreeCodebooks(3, 4, 6, 5, dead_code_steps=2)
    with torch.no_grad():
        tree.root_W.copy_(torch.randn(5, 5) + 3 * torch.eye(5))
    x = tree.root_codebook().detach()[0] + 0.01 * torch.randn(8, 3, 5)   # every item next to root code 0
    for _ in range(2):
        tree(x)
    assert (tree.root_unused[1:] >= 2).all() and tree.root_unused[0] == 0
    n = tree.restart_dead_codes()
    assert n >= 3 and (tree.root_unused == 0).all()
    pool = prefix_residual(x)[:, 0]
    new = tree.root_codebook().detach()[1:]
    dist = torch.cdist(new, pool).min(1).values           # e W lands exactly on a recent basic representation
    assert dist.max() < 1e-4
    tree.freeze_embeddings()                               # fine-tuning: used rows kept, dead rows re-seeded
    y = x + 0.5 * torch.randn(1, 3, 5)                     # the new domain sits elsewhere, next to one code
    tree(y), tree(y)
    before = tree.root_E.detach().clone()
    dead = (tree.root_unused >= 2).nonzero().squeeze(1)
    assert len(dead) >= 3
    assert tree.restart_dead_codes() >= len(dead)
    assert not tree.root_E.requires_grad
    kept = [i for i in range(4) if i not in set(dead.tolist())]
    assert torch.equal(tree.root_E[kept], before[kept]) and not torch.equal(tree.root_E[dead], before[dead])
    dist = torch.cdist(tree.root_codebook().detach()[dead], prefix_residual(y)[:, 0]).min(1).values
    assert dist.max() < 1e-4


def test_finetuning_freezes_codebook_embeddings_only(paths):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer import UTGRecTokenizerConfig, build_model, freeze_for_finetuning
    from tests.utgrec_fixtures import tiny_overrides

    o = [(k.removeprefix("utgrec."), v) for k, v in tiny_overrides(paths[0], paths[1])]
    model, latents = build_model(load_config(UTGRecTokenizerConfig, None, o))
    freeze_for_finetuning(model)
    assert not model.tree.root_E.requires_grad and not model.tree.leaf_E.requires_grad
    assert model.tree.root_W.requires_grad and model.tree.leaf_W.requires_grad
    assert all(p.requires_grad for p in model.text_decoder.parameters())
    assert any(p.requires_grad for n, p in model.encoder.named_parameters() if "lora_" in n)


def test_model_forward_backward_with_mixed_images(paths):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer import UTGRecTokenizerConfig, build_model, tokenizer_loss
    from tests.utgrec_fixtures import tiny_overrides

    o = [(k.removeprefix("utgrec."), v) for k, v in tiny_overrides(paths[0], paths[1])]
    cfg = load_config(UTGRecTokenizerConfig, None, o)
    torch.manual_seed(8)
    model, latents = build_model(cfg)
    ims = _images(4)
    images = [ims[0], None, None, ims[3]]                  # anchors: 1 with an image; positives: 1
    texts = TEXTS[:2] + TEXTS[2:]
    enc = model.encoder.prepare(texts, images)
    ids, mask = model.encoder.text_targets(texts, 16)
    has = torch.tensor([im is not None for im in images])
    lat = torch.zeros(4, latents.num_tokens, latents.token_dim)
    lat[has] = latents(torch.stack([im for im in images if im is not None]))
    out = model(enc, ids, mask, lat, has)
    assert out.h.shape == (4, 3, model.encoder.hidden_size) and out.tree.codes.shape == (2, 3)
    assert out.image.per_item[1] == 0 and out.image.per_item[2] == 0 and out.image.per_item[0] > 0
    parts = tokenizer_loss(out, cfg.loss)
    assert all(torch.isfinite(v) for v in parts.values())
    parts["loss"].backward()
    assert model.tree.root_E.grad is not None and model.tree.leaf_W.grad is not None
    assert model.image_decoder.diffusion.net.out.weight.grad.abs().sum() > 0


def test_random_init_builds_from_a_config_folder_without_weights(tmp_path):
    """``encoder.random_init``: what tools/device_check.sh uses for a Qwen2-VL-2B-sized model (here tiny sizes)."""
    from megarec.methods.utgrec.content_encoder import QwenVLEncoder
    from tests.tiny_models import QWEN2VL_2B_TEXT, save_qwen2vl_config

    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    path = save_qwen2vl_config(tmp_path / "skeleton", text, vision)
    assert not list(path.glob("*.safetensors")) and QWEN2VL_2B_TEXT["hidden_size"] == 1536
    enc = QwenVLEncoder(str(path), 3, random_init=True, max_text_tokens=16)
    emb = [p for n, p in enc.named_parameters() if n.endswith("embed_tokens.token_adapter.base_layer.weight")]
    assert emb[0].shape[0] == 512                                   # the config's spare rows hold the codes: no resize
    h = enc(**enc.prepare(TEXTS[:2], _images(2)))
    assert h.shape == (2, 3, 32)
