"""RQ-VAE: the L_SQ objective, gradients, a short training run, save / load."""
import pytest
import torch

from megarec.config import RQVAEConfig, TokenizerConfig, load_config
from megarec.data.domain import DataError
from megarec.tokenizer import RQVAE, reconstruction_loss, uniformity_loss
from megarec.tokenizer.train import train_rqvae


def small_cfg(**kw) -> RQVAEConfig:
    base = dict(hidden=[24, 12], code_dim=6, codebook_sizes=[8, 8, 4], dead_code_steps=0)
    base.update(kw)
    return RQVAEConfig(**base)


def clustered(n=240, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g) * 3
    return centres[torch.arange(n) % 12] + 0.3 * torch.randn(n, d, generator=g)


def test_reconstruction_loss_is_squared_error_per_item():
    z, zh = torch.randn(5, 3), torch.randn(5, 3)
    naive = sum(float(((z[i] - zh[i]) ** 2).sum()) for i in range(5)) / 5
    assert reconstruction_loss(z, zh).item() == pytest.approx(naive, rel=1e-6)


def test_hard_forward_is_L_SQ_and_every_part_gets_gradients():
    torch.manual_seed(0)
    model = RQVAE(16, small_cfg())
    z = clustered(40)
    out = model(z)
    assert out.codes.shape == (40, 3) and out.reconstruction.shape == (40, 16)
    assert out.loss.item() == pytest.approx(out.recon_loss.item() + out.quant_loss.item(), rel=1e-6)
    assert out.recon_loss.item() == pytest.approx(reconstruction_loss(z, model.decoder(
        model.quantizer(model.encoder(z)).quantized)).item(), rel=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_soft_forward_uses_uniformity_not_quantisation_loss():
    torch.manual_seed(1)
    model = RQVAE(16, small_cfg(quantizer="soft", uniformity_weight=0.5))
    z = clustered(40)
    out = model(z, tau=0.3)
    assert float(model.tau) == pytest.approx(0.3)
    assert out.quant_loss.item() == 0.0
    assert out.uniformity.item() == pytest.approx(uniformity_loss(out.probs).item())
    assert out.loss.item() == pytest.approx(out.recon_loss.item() + 0.5 * out.uniformity.item(), rel=1e-6)
    out.loss.backward()
    assert all(torch.count_nonzero(C.grad) > 0 for C in model.quantizer.codebooks())


@pytest.mark.parametrize("quantizer", ["hard", "soft"])
def test_short_training_reduces_loss_and_uses_codes(quantizer):
    x = clustered(240)
    cfg = TokenizerConfig(rqvae=small_cfg(quantizer=quantizer, dead_code_steps=5, tau_max=0.5, tau_min=0.05),
                          epochs=60, batch_size=60, lr=3e-3, eval_every=20, kmeans_samples=120)
    torch.manual_seed(0)
    untrained = RQVAE(16, cfg.rqvae)
    with torch.no_grad():
        start = untrained(x, 0.5).recon_loss.item()
    model, summary = train_rqvae(x, cfg, progress=False)
    assert not model.training and summary["steps"] == 60 * 4
    with torch.no_grad():
        end = model(x, cfg.rqvae.tau_min).recon_loss.item()
    assert end < 0.5 * start
    assert summary["final_usage"] > 0.5
    if quantizer == "soft":
        assert float(model.tau) == pytest.approx(cfg.rqvae.tau_min, rel=0.05)   # annealed to tau_min


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    cfg = load_config(TokenizerConfig, None, ["--rqvae.hidden", "24,12", "--rqvae.code_dim", "6",
                                              "--rqvae.codebook_sizes", "8,8,4"])
    model = RQVAE(16, cfg.rqvae).eval()
    model.init_codebooks(clustered(100))
    model.save(tmp_path, cfg, {"input": "text"})
    back, cfg2, extra = RQVAE.load(tmp_path)
    x = clustered(50, seed=3)
    assert cfg2 == cfg and extra == {"input": "text"}
    assert torch.equal(back.last_level(x)[0], model.last_level(x)[0])
    assert bool(back.quantizer.initialised)
    with pytest.raises(DataError, match="not a trained tokenizer"):
        RQVAE.load(tmp_path / "missing")
    (tmp_path / "config.yaml").write_text("rqvae:\n  code_dim: 7\n")
    with pytest.raises(DataError, match="does not match"):
        RQVAE.load(tmp_path)


def test_config_rejects_bad_values():
    from megarec.config import ConfigError

    with pytest.raises(ConfigError, match="tau_min"):
        load_config(TokenizerConfig, None, ["--rqvae.tau_min", "0.5", "--rqvae.tau_max", "0.1"])
    with pytest.raises(ConfigError, match="quantizer"):
        load_config(TokenizerConfig, None, ["--rqvae.quantizer", "fuzzy"])
    with pytest.raises(ConfigError, match="codebook_sizes"):
        load_config(TokenizerConfig, None, ["--rqvae.codebook_sizes", "256,0"])


def _unit_clusters(n=512, d=96, k=32, seed=0):
    """Unit-norm inputs like sentence-encoder text embeddings: k tight clusters on the sphere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    noise = 0.05 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(centres[torch.arange(n) % k] + noise, dim=1)


@pytest.mark.parametrize("hidden", [[256, 128, 64], [512, 256, 128, 64]])
def test_soft_latent_distances_are_on_the_papers_temperature_scale(hidden):
    """Regression test of the soft-quantiser collapse on text embeddings: with PyTorch's default
    Linear init, unit-norm inputs reach the latent nearly constant (biases dominate), squared
    distances to the codes are ~1e-5, and softmax(-d^2 / tau) is uniform even at the paper's
    tau_min = 0.001, so every item is quantised to the mean codeword. The soft RQ-VAE's default
    init (xavier-normal, zero biases, as the public UniGRec code) puts them on tau's scale."""
    from megarec.kernels import code_probs

    x = _unit_clusters()
    K = 64

    def level1(init):
        torch.manual_seed(0)
        m = RQVAE(x.shape[1], RQVAEConfig(hidden=hidden, code_dim=32, codebook_sizes=[K, K], quantizer="soft",
                                           init=init))
        with torch.no_grad():
            m.init_codebooks(x, torch.Generator().manual_seed(0))
            p = code_probs(m.encoder(x), m.quantizer.codebook(0), m.cfg.tau_min)
        return m, p.max(1).values.mean().item()

    model, sharp = level1("auto")
    assert model.init_kind == "xavier" and model.recon_reduction == "mean"
    assert sharp > 0.3, f"level-1 assignment at tau_min is near uniform (mean max prob {sharp:.3f}, uniform {1 / K})"
    _, collapsed = level1("torch")
    assert collapsed < 0.05                      # the failure this guards against
    hard = RQVAE(x.shape[1], RQVAEConfig(hidden=hidden, code_dim=32, codebook_sizes=[K]))
    assert hard.init_kind == "torch" and hard.recon_reduction == "sum"    # the hard path is unchanged


def test_soft_reconstruction_is_the_per_element_mse():
    """UniGRec's lambda_CU = 1e-4 is relative to the public code's F.mse_loss (mean over dimensions)."""
    z, zh = torch.randn(5, 3), torch.randn(5, 3)
    assert reconstruction_loss(z, zh, "mean").item() == pytest.approx(
        torch.nn.functional.mse_loss(zh, z).item(), rel=1e-6)
    torch.manual_seed(1)
    model = RQVAE(16, small_cfg(quantizer="soft"))
    z = clustered(40)
    out = model(z, tau=0.3)
    zh = model.decoder(model.quantizer(model.encoder(z), 0.3).quantized)
    assert out.recon_loss.item() == pytest.approx(torch.nn.functional.mse_loss(zh, z).item(), rel=1e-5)
