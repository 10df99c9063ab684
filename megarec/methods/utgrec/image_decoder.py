"""UTGRec image reconstruction (Sec. 2.3.1, Eq. 9): a diffusion loss on VAE latents.

- :class:`ImageLatents`: a frozen diffusers ``AutoencoderKL`` turns an item image into
  latent tokens ``[|V|, C p^2]`` (the latent's mode times the VAE's scaling factor,
  cut into p x p patches);
- :class:`~megarec.methods.utgrec.text_decoder.MaskedDecoderLayer` over ``[H_hat, |V| mask
  tokens]`` gives one condition per latent token (``Dec^v``);
- :class:`DiffusionHead`: a small MLP denoiser with AdaLN conditioning (as in "Autoregressive
  Image Generation without Vector Quantization", the paper's ref. [20]) trained to predict the
  noise added by a diffusers ``DDPMScheduler`` (cosine schedule, 1000 training steps), with
  several timesteps per token. Items without an image contribute nothing; a batch with no
  image at all gives an exact zero (with gradients, so every rank runs every module).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megarec.methods.utgrec.text_decoder import MaskedDecoderLayer


class ImageLatents(nn.Module):
    """Frozen ``AutoencoderKL`` (loaded with ``from_pretrained(path)``): uint8 images -> latent tokens."""

    def __init__(self, path: str, image_size: int = 256, patch: int = 2) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        from megarec.methods.utgrec.content_encoder import local_only

        self.vae = AutoencoderKL.from_pretrained(path, **local_only(path)).eval().requires_grad_(False)
        self.image_size, self.patch = int(image_size), int(patch)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.image_size // down
        if self.image_size % down or side % self.patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the VAE's downsampling ({down}) x "
                             f"latent patch ({patch})")
        self.num_tokens = (side // self.patch) ** 2
        self.token_dim = int(self.vae.config.latent_channels) * self.patch ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` uint8 (any size; resized) -> ``[B, |V|, C p^2]`` float32."""
        x = images.float().div(127.5).sub(1.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(x.to(dtype)).latent_dist.mode().float()
        z = (z - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        B, C, h, w = z.shape
        p = self.patch
        z = z.view(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(B, (h // p) * (w // p), C * p * p)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``[N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class AdaLNBlock(nn.Module):
    """Residual MLP block whose LayerNorm is shifted, scaled and gated by the condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class AdaLNDenoiser(nn.Module):
    """``eps_hat(x_t, t, cond)``: an MLP with AdaLN conditioning on ``t`` and the decoder's condition."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 512, depth: int = 3) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Linear(token_dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        nn.init.zeros_(self.final_ada[1].weight), nn.init.zeros_(self.final_ada[1].bias)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.time(timestep_embedding(t, self.width).to(x.dtype)) + self.cond(cond)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


class DiffusionOutput(NamedTuple):
    per_item: torch.Tensor   # [B] mean noise-prediction error over the item's tokens and timesteps (0 without image)
    has_image: torch.Tensor  # [B] bool


class DiffusionHead(nn.Module):
    """``DiffLoss(Dec^v(H^v), V)`` of Eq. 9 given per-token conditions; see the module docstring."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 512, depth: int = 3,
                 num_train_timesteps: int = 1000, schedule: str = "squaredcos_cap_v2", samples_per_token: int = 4) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.net = AdaLNDenoiser(token_dim, cond_dim, width, depth)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=schedule)
        self.samples_per_token = int(samples_per_token)

    def forward(self, cond: torch.Tensor, target: torch.Tensor, has_image: torch.Tensor) -> DiffusionOutput:
        """``cond [B, V, D]``, ``target [B, V, C]`` latent tokens, ``has_image [B]`` -> per-item loss.

        Every token is noised at ``samples_per_token`` independent timesteps ``t ~ U{0..T-1}``;
        ``x_t = add_noise(x_0, eps, t)`` and the loss is ``||eps - eps_hat(x_t, t, cond)||^2``
        averaged over channels, timesteps and tokens.
        """
        B, V, C = target.shape
        S = self.samples_per_token
        x0 = target.float().unsqueeze(1).expand(B, S, V, C).reshape(-1, C)
        c = cond.unsqueeze(1).expand(B, S, V, cond.shape[-1]).reshape(-1, cond.shape[-1])
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = self.net(xt.to(c.dtype), t, c)
        err = ((pred.float() - noise) ** 2).mean(-1).view(B, S * V).mean(1)
        return DiffusionOutput(err * has_image.to(err.dtype), has_image.bool())


class ImageDecoder(nn.Module):
    """Dec^v (one bidirectional layer over ``[H_hat, |V| mask tokens]``) followed by the diffusion head."""

    def __init__(self, dim: int, num_tokens: int, token_dim: int, num_levels: int, heads: int = 8,
                 dropout: float = 0.1, width: int = 512, depth: int = 3, num_train_timesteps: int = 1000,
                 samples_per_token: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.body = MaskedDecoderLayer(dim, num_tokens, num_levels, heads, dropout)
        self.diffusion = DiffusionHead(token_dim, dim, width, depth, num_train_timesteps,
                                       samples_per_token=samples_per_token)

    def forward(self, h_hat: torch.Tensor, latents: torch.Tensor, has_image: torch.Tensor) -> DiffusionOutput:
        return self.diffusion(self.body(h_hat, self.num_tokens), latents, has_image)
