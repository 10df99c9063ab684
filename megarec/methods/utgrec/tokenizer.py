"""UTGRec tokenizer side: config, model builder, the losses of Eqs. 10-13 and the codebook warm-up.

``L_T = L_Raw + lambda L_Code + mu L_Ali + eta L_Re`` (Eq. 13) with
``L_Raw = L^t + alpha L^v`` (Eq. 10, the anchor's own text and image from its ``H_hat``),
``L_Re = L^{t+} + alpha L^{v+}`` (Eq. 12, the co-occurring item's text and image from the
anchor's ``H_hat``), ``L_Ali`` the per-level InfoNCE between ``H`` and ``H+`` (Eq. 11, in-batch
and cross-rank negatives) and ``L_Code`` (Eqs. 5-7). Defaults are the paper's (Sec. 3.1.4):
lambda 200, alpha 3, mu 0.01, eta 0.03, tau 0.1 (the public code uses alpha 5).

Normalisation: Eq. 8 sums token NLLs per item; here ``L^t`` is the mean NLL per text token
of the batch and ``L^v`` the mean diffusion loss per item that has an image (0 when none has).

Warm-up: for the first ``loss.warmup_steps`` optimizer steps the quantiser is bypassed
(``H_hat`` from the continuous ``H'``, L_Code weighted 0); at the first quantised step the
codebooks can be initialised by k-means on that batch (``codebook.kmeans_init``). The step
count is the optimizer's, so a resumed run continues the schedule where it stopped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megarec.config import field
from megarec.kernels import infonce
from megarec.methods.utgrec.model import UTGRecModel, UTGRecOutput


@dataclasses.dataclass
class EncoderConfig:
    backend: str = field("qwen2vl", choices=("qwen2vl", "text"),
                         help="qwen2vl: Qwen2-VL + LoRA on text and image; text: any HF text encoder (CPU runs)")
    path: str = field("", help="model folder or hub id (qwen2vl: e.g. Qwen/Qwen2-VL-2B-Instruct; text: empty = "
                               "bundled all-MiniLM-L6-v2)")
    random_init: bool = field(False, help="build the encoder from its config with random weights (benchmarks)")
    lora_r: int = field(8, min=1)
    lora_alpha: int = field(32, min=1)
    lora_dropout: float = field(0.1, min=0.0, max=0.99)
    lora_target_modules: str = field("", help="regex on full module names of the linear layers that get LoRA "
                                              "(empty: every linear layer of the language model / text encoder)")
    train_vision: bool = field(False, help="also train the vision tower (frozen by default)")
    max_text_tokens: int = field(256, min=8, help="item-text tokens in the encoder prompt")
    image_size: int = field(224, min=28, help="the encoder's square image side, rounded to a multiple of 28 "
                                              "(Qwen2-VL: (side/28)^2 visual tokens; 224 -> 64); images are read "
                                              "at it from the shards")
    gradient_checkpointing: str = field("auto", choices=("auto", "on", "off"), help="auto: on for GPU runs")


@dataclasses.dataclass
class CodebookConfig:
    levels: int = field(3, min=2, help="L: codes per item (root + L-1 leaf levels)")
    root_size: int = field(256, min=1)
    leaf_size: int = field(512, min=1, help="size of the one leaf codebook shared by levels 2..L")
    dim: int = field(128, min=1, help="codebook dimension d_c")
    adapter_hidden: int = field(512, min=1, help="hidden width of the MLP adapter d -> d_c")
    beta: float = field(0.25, min=0.0, help="commitment weight (Eqs. 6-7)")
    dead_code_steps: int = field(0, min=0, help="re-seed codes unused for this many steps (0 = never, as the paper)")
    kmeans_init: bool = field(True, help="k-means init of the codebooks at the first quantised step")


@dataclasses.dataclass
class DecoderConfig:
    dim: int = field(0, min=0, help="decoder width D (0 = the encoder's hidden size)")
    heads: int = field(8, min=1)
    dropout: float = field(0.1, min=0.0, max=0.99)
    max_text_tokens: int = field(128, min=1, help="text tokens reconstructed per item (Eq. 8)")
    vae_path: str = field("", help="diffusers AutoencoderKL folder for image latents (empty = no image loss)")
    latents_file: str = field("", help="precomputed VAE latents (python -m megarec.methods.utgrec.latent_cache); "
                                       "replaces vae_path: no VAE runs during training")
    vae_image_size: int = field(256, min=8, help="the VAE's square image size, read from the stored image (not from "
                                                 "the encoder's)")
    cache_latents: bool = field(True, help="with vae_path: encode the catalogue's images once before training "
                                           "(every rank a slice) into SHARDS/latents-<vae hash>-<size>px-p<patch>"
                                           ".safetensors and read those rows; false: run the VAE every step")
    latent_patch: int = field(2, min=1, help="latent tokens are p x p patches of the VAE latent")
    diffusion_width: int = field(512, min=8)
    diffusion_depth: int = field(3, min=1)
    num_train_timesteps: int = field(1000, min=2)
    samples_per_token: int = field(4, min=1, help="diffusion timesteps drawn per latent token")


@dataclasses.dataclass
class LossConfig:
    lambda_code: float = field(200.0, min=0.0, help="lambda: weight of L_Code (Eq. 13)")
    alpha: float = field(3.0, min=0.0, help="alpha: image vs text reconstruction (Eqs. 10, 12)")
    mu: float = field(0.01, min=0.0, help="mu: weight of L_Ali (Eq. 13)")
    eta: float = field(0.03, min=0.0, help="eta: weight of L_Re (Eq. 13)")
    tau: float = field(0.1, min=1e-6, help="InfoNCE temperature (Eq. 11)")
    warmup_steps: int = field(300, min=0, help="optimizer steps with the quantiser bypassed")


@dataclasses.dataclass
class UTGRecTokenizerConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def build_model(cfg: UTGRecTokenizerConfig, gpu: bool = False, ds_config: dict | None = None):
    """``(UTGRecModel, image targets)``: targets are an ``ImageLatents`` (the VAE, kept outside the model: frozen,
    not partitioned), a ``LatentCache`` (``decoder.latents_file``) or ``None`` (no image loss).

    ``ds_config``: the resolved DeepSpeed config of the run; under ZeRO-3 the content encoder (the frozen
    base) is built partitioned (:func:`~megarec.methods.utgrec.content_encoder.partitioned_build`). The
    tokenizer's own heads are built whole and partitioned by ``deepspeed.initialize``."""
    from megarec.methods.utgrec.content_encoder import build_content_encoder
    from megarec.methods.utgrec.image_decoder import ImageLatents

    e = cfg.encoder
    ckpt = e.gradient_checkpointing == "on" or (e.gradient_checkpointing == "auto" and gpu)
    encoder = build_content_encoder(e.backend, e.path, cfg.codebook.levels, random_init=e.random_init,
                                    lora_r=e.lora_r, lora_alpha=e.lora_alpha, lora_dropout=e.lora_dropout,
                                    lora_targets=e.lora_target_modules, train_vision=e.train_vision,
                                    max_text_tokens=e.max_text_tokens, image_size=e.image_size,
                                    gradient_checkpointing=ckpt, ds_config=ds_config)
    d = cfg.decoder
    from megarec.methods.utgrec.latent_cache import LatentCache

    if d.latents_file:
        latents = LatentCache(d.latents_file)
    else:
        latents = ImageLatents(d.vae_path, d.vae_image_size, d.latent_patch) if d.vae_path else None
    c = cfg.codebook
    model = UTGRecModel(encoder, num_levels=c.levels, root_size=c.root_size, leaf_size=c.leaf_size, code_dim=c.dim,
                        adapter_hidden=c.adapter_hidden, decoder_dim=d.dim, decoder_heads=d.heads,
                        decoder_dropout=d.dropout, max_text_tokens=d.max_text_tokens,
                        image_tokens=latents.num_tokens if latents else 0,
                        image_token_dim=latents.token_dim if latents else 0, diffusion_width=d.diffusion_width,
                        diffusion_depth=d.diffusion_depth, num_train_timesteps=d.num_train_timesteps,
                        samples_per_token=d.samples_per_token, beta=c.beta, dead_code_steps=c.dead_code_steps)
    from megarec.methods.utgrec.content_encoder import match_partitioned_dtype

    match_partitioned_dtype(model, ds_config)
    return model, latents


def freeze_for_finetuning(model: UTGRecModel) -> None:
    """Sec. 2.4.2: ``E^r, E^f`` frozen; ``W``, LoRA, code-token rows, adapter and decoders trained; L fixed."""
    model.tree.freeze_embeddings(True)


# ----------------------------------------------------------------------------------- losses
def alignment_loss(h: torch.Tensor, h_pos: torch.Tensor, tau: float) -> torch.Tensor:
    """UTGRec Eq. 11: ``sum_l InfoNCE(h_l, h_l^+)`` with cosine similarity / tau, the positives of the batch
    (every rank's, when distributed) as candidates; mean over anchors. ``h, h_pos [B, L, d]``.
    The ranks' batch sizes are gathered once (on the host) for the L levels."""
    from megarec.distributed import gather_sizes

    sizes = gather_sizes(h.shape[0])
    return sum(infonce(h[:, l].float(), h_pos[:, l].float(), tau, bidirectional=False, gather=True, sizes=sizes)
               for l in range(h.shape[1]))


def reconstruction_loss(nll: torch.Tensor, tokens: torch.Tensor, diff: torch.Tensor, has_image: torch.Tensor,
                        alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L^t + alpha L^v, L^t, L^v)`` (Eqs. 10, 12) for rows of per-item text NLL sums, token counts and diffusion
    losses: ``L^t`` per text token, ``L^v`` per item with an image (exactly 0, with gradients, when none has)."""
    lt = nll.sum() / tokens.sum().clamp_min(1)
    lv = diff.sum() / has_image.sum().clamp_min(1)
    return lt + alpha * lv, lt, lv


def quantizing(step: int, warmup_steps: int) -> bool:
    """Whether optimizer step ``step`` (0-based) uses the quantiser (after the warm-up)."""
    return step >= warmup_steps


def tokenizer_loss(out: UTGRecOutput, cfg: LossConfig, quantize: bool = True) -> dict[str, torch.Tensor]:
    """``L_T`` (Eq. 13) and its parts from one forward over B anchors + B positives."""
    B = out.h.shape[0] // 2
    raw, lt, lv = reconstruction_loss(out.text_nll[:B], out.text_tokens[:B], out.image.per_item[:B],
                                      out.image.has_image[:B], cfg.alpha)
    re, lt_pos, lv_pos = reconstruction_loss(out.text_nll[B:], out.text_tokens[B:], out.image.per_item[B:],
                                             out.image.has_image[B:], cfg.alpha)
    ali = alignment_loss(out.h[:B], out.h[B:], cfg.tau)
    code = out.tree.loss
    lam = cfg.lambda_code if quantize else 0.0
    total = raw + lam * code + cfg.mu * ali + cfg.eta * re
    return {"loss": total, "raw": raw.detach(), "code": code.detach(), "ali": ali.detach(), "re": re.detach(),
            "text": lt.detach(), "image": lv.detach(), "text_pos": lt_pos.detach(), "image_pos": lv_pos.detach()}


def config_dict(cfg: UTGRecTokenizerConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
