"""RQ-VAE item tokenizer (TIGER, ETEGRec Sec. 3.2.1, UniGRec Sec. 3.1).

``r = Encoder(z)`` (Eq. 3), residual quantisation of ``r`` into L codes
(hard: :class:`ResidualQuantizer`, soft: :class:`SoftResidualQuantizer`),
``z~ = Decoder(r~)`` (Eq. 7). Hard training minimises
``L_SQ = ||z - z~||^2 + L_RQ`` (ETEGRec Eqs. 8-10); soft pre-training minimises
``||z - z~||^2 / in_dim + lambda_CU L_CU`` (UniGRec Eq. 21, no quantisation term; the
per-element MSE of the public UniGRec code, which its lambda_CU is tuned to).

The soft quantiser's temperature acts on squared latent distances, so the soft RQ-VAE
initialises its MLPs as the public UniGRec code does (xavier-normal, zero biases):
with PyTorch's default init, unit-norm text embeddings reach a nearly constant latent
and ``softmax(-d^2 / tau)`` is uniform over the paper's whole tau range (``rqvae.init``,
``rqvae.recon``; the hard RQ-VAE keeps PyTorch's init and the summed error).

Saved as ``model.safetensors`` (weights and buffers, no pickle) plus
``config.yaml`` (the :class:`~megarec.config.TokenizerConfig` it was trained with).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megarec.config import ConfigError, RQVAEConfig, TokenizerConfig, load_config, save_config
from megarec.data.domain import DataError
from megarec.tokenizer.residual import ResidualQuantizer
from megarec.tokenizer.soft import SoftResidualQuantizer, uniformity_loss

FORMAT = "megarec-rqvae/1"
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def mlp(widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers through ``widths`` with ReLU (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def reconstruction_loss(z: torch.Tensor, z_hat: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """ETEGRec Eq. 9 / UniGRec Eq. 7: ``||z - z~||^2``, mean over items.

    ``reduction`` over dimensions: ``"sum"`` (the squared norm, ETEGRec Eq. 9) or ``"mean"``
    (the per-element MSE of the public UniGRec code, the scale its loss weights are tuned to).
    """
    per_item = ((z - z_hat) ** 2).sum(-1)
    if reduction == "mean":
        return per_item.mean() / z.shape[-1]
    if reduction != "sum":
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    return per_item.mean()


def xavier_init_(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every ``nn.Linear`` in ``module`` (the public
    UniGRec/TIGER RQ-VAE code). On unit-norm inputs it keeps the item-to-item spread of the latent
    ~10x (squared distances ~100x) larger than PyTorch's default init, whose biases dominate a
    nearly constant latent; the soft quantiser's temperature is on that squared-distance scale."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class RQVAEOutput(NamedTuple):
    """A NamedTuple so DeepSpeed ZeRO-3's hooks see the tensors inside (a dataclass hides them)."""

    reconstruction: torch.Tensor   # z~ [N, in_dim]
    codes: torch.Tensor            # [N, L]
    loss: torch.Tensor             # total training loss
    recon_loss: torch.Tensor       # Eq. 9
    quant_loss: torch.Tensor       # Eq. 10 (hard) or 0 (soft)
    uniformity: torch.Tensor       # UniGRec Eq. 17 (soft) or 0 (hard)
    probs: list[torch.Tensor] | None


class RQVAE(nn.Module):
    """MLP encoder -> residual quantiser (hard or soft) -> MLP decoder."""

    def __init__(self, in_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.in_dim, self.cfg = int(in_dim), cfg
        widths = [self.in_dim, *cfg.hidden, cfg.code_dim]
        self.encoder = mlp(widths, cfg.dropout)
        self.decoder = mlp(widths[::-1], cfg.dropout)
        if cfg.quantizer == "soft":
            self.quantizer: ResidualQuantizer | SoftResidualQuantizer = SoftResidualQuantizer(
                cfg.codebook_sizes, cfg.code_dim, cfg.dead_code_steps, cfg.kmeans_iters)
        else:
            self.quantizer = ResidualQuantizer(cfg.codebook_sizes, cfg.code_dim, cfg.beta, cfg.dead_code_steps,
                                               cfg.kmeans_iters)
        self.register_buffer("tau", torch.tensor(float(cfg.tau_max)))
        if self.init_kind == "xavier":
            xavier_init_(self.encoder)
            xavier_init_(self.decoder)

    @property
    def soft(self) -> bool:
        return isinstance(self.quantizer, SoftResidualQuantizer)

    @property
    def init_kind(self) -> str:
        """``rqvae.init`` resolved: ``auto`` is xavier for the soft quantiser, PyTorch's default for hard."""
        return self.cfg.init if self.cfg.init != "auto" else ("xavier" if self.soft else "torch")

    @property
    def recon_reduction(self) -> str:
        """``rqvae.recon`` resolved: ``auto`` is the per-element mean for soft, the sum for hard."""
        return self.cfg.recon if self.cfg.recon != "auto" else ("mean" if self.soft else "sum")

    @property
    def codebook_sizes(self) -> list[int]:
        return list(self.cfg.codebook_sizes)

    def forward(self, z: torch.Tensor, tau: float | None = None) -> RQVAEOutput:
        """``tau`` (soft only) sets and records the current temperature (UniGRec Eq. 16)."""
        r = self.encoder(z)
        if self.soft:
            if tau is not None:
                self.tau.fill_(float(tau))
            q = self.quantizer(r, float(self.tau))
            uni = uniformity_loss(q.probs)
        else:
            q = self.quantizer(r)
            uni = r.new_zeros(())
        z_hat = self.decoder(q.quantized)
        recon = reconstruction_loss(z, z_hat, self.recon_reduction)
        loss = recon + q.loss + (self.cfg.uniformity_weight * uni if self.soft else 0.0)
        return RQVAEOutput(z_hat, q.codes, loss, recon, q.loss, uni, q.probs)

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means initialisation of every level from the encoder outputs of ``z``."""
        self.quantizer.init_from_data(self.encoder(z), generator)

    @torch.no_grad()
    def last_level(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, L], last-level input [N, code_dim])`` for catalogue assignment."""
        r = self.encoder(z)
        if self.soft:
            return self.quantizer.last_level(r, float(self.tau))
        return self.quantizer.last_level(r)

    def last_codebook(self) -> torch.Tensor:
        return self.quantizer.last_codebook()

    # -- files ---------------------------------------------------------------------
    def save(self, out_dir: str | Path, cfg: TokenizerConfig, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` and ``config.yaml`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "in_dim": str(self.in_dim), "extra": json.dumps(extra or {})}
        save_file(state, str(out / WEIGHTS), metadata=meta)
        save_config(cfg, out / CONFIG)

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> tuple["RQVAE", TokenizerConfig, dict]:
        """``(model in eval mode, its TokenizerConfig, the extra dict given to save)``."""
        d = Path(model_dir)
        if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
            raise DataError(f"{d}: not a trained tokenizer (expected {WEIGHTS} and {CONFIG})")
        try:
            cfg = load_config(TokenizerConfig, d / CONFIG)
        except ConfigError as e:
            raise DataError(f"{d / CONFIG}: {e}") from e
        with safe_open(str(d / WEIGHTS), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != FORMAT:
            raise DataError(f"{d / WEIGHTS}: format {meta.get('format')!r}, expected {FORMAT!r}")
        model = cls(int(meta["in_dim"]), cfg.rqvae)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(f"{d / WEIGHTS} does not match {d / CONFIG}: {e}") from e
        return model.to(device).eval(), cfg, json.loads(meta.get("extra", "{}"))
