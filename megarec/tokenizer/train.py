"""RQ-VAE training on item embeddings (the ``megarec train-tokenizer`` loop).

A catalogue of item embeddings fits in memory (a million 384-d items is 1.5 GB),
so this is a plain single-process loop: shuffled mini-batches, AdamW, k-means
initialisation from the first shuffled batches, dead-code restarts after each
step, the soft quantiser's temperature annealed over all steps (UniGRec
Eq. 16). TensorBoard gets ``loss/*``, ``tau`` and, every ``eval_every``
epochs, the catalogue's ``codebook/usage``, ``codebook/perplexity`` and
``codebook/collision_rate`` (level means, and per level ``codebook/usage_l<i>``,
``codebook/perplexity_l<i>``); tqdm shows progress.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import trange

from megarec.config import TokenizerConfig
from megarec.distributed import get_logger
from megarec.tokenizer.assign import catalogue_codes, collision_rate, level_stats
from megarec.tokenizer.rqvae import RQVAE
from megarec.tokenizer.soft import linear_tau


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from megarec.config import ConfigError

        raise ConfigError("device: cuda requested but no GPU is available")
    return torch.device(name)


def catalogue_metrics(model: RQVAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Collision rate and level-mean usage / perplexity of the codes of every item (no collision handling)."""
    was_training = model.training
    model.eval()
    codes, _ = catalogue_codes(model, x, batch_size)
    model.train(was_training)
    levels = level_stats(codes, model.codebook_sizes)
    out = {"collision_rate": collision_rate(codes),
           "usage": sum(s["usage"] for s in levels) / len(levels),
           "perplexity": sum(s["perplexity"] for s in levels) / len(levels)}
    for i, s in enumerate(levels):
        out[f"usage_l{i + 1}"], out[f"perplexity_l{i + 1}"] = s["usage"], s["perplexity"]
    return out


def train_rqvae(x: torch.Tensor, cfg: TokenizerConfig, log_dir: str | Path | None = None,
                progress: bool = True) -> tuple[RQVAE, dict[str, Any]]:
    """Train an RQ-VAE on ``x [N, in_dim]``; returns the model (eval mode) and a summary of the run."""
    log = get_logger()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = x.float().to(device)
    n = x.shape[0]
    model = RQVAE(x.shape[1], cfg.rqvae).to(device)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    first = torch.randperm(n, generator=gen)
    if cfg.rqvae.kmeans_init:
        model.init_codebooks(x[first[: cfg.kmeans_samples].to(device)], gen)
    init_metrics = catalogue_metrics(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    step, restarts, last = 0, 0, {}
    bar = trange(cfg.epochs, desc="train tokenizer", unit="epoch", disable=not progress)
    for epoch in bar:
        perm = first if epoch == 0 else torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            xb = x[perm[s:s + bs].to(device)]
            tau = linear_tau(step, total, cfg.rqvae.tau_max, cfg.rqvae.tau_min) if model.soft else None
            out = model(xb, tau)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            restarts += model.quantizer.restart_dead_codes(opt, gen)
            step += 1
            last = {"loss/total": out.loss.item(), "loss/recon": out.recon_loss.item(),
                    "loss/quant": out.quant_loss.item(), "loss/uniformity": out.uniformity.item()}
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(k, v, step)
                if tau is not None:
                    writer.add_scalar("tau", tau, step)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            m = catalogue_metrics(model, x)
            if writer is not None:
                for k, v in m.items():
                    writer.add_scalar(f"codebook/{k}", v, step)
                writer.add_scalar("codebook/restarts", restarts, step)
            bar.set_postfix(loss=f"{last['loss/total']:.4f}", coll=f"{m['collision_rate']:.4f}")
            log.info("epoch %d step %d loss %.5f recon %.5f collision_rate %.4f usage %.3f restarts %d",
                     epoch + 1, step, last["loss/total"], last["loss/recon"], m["collision_rate"], m["usage"],
                     restarts)
    if writer is not None:
        writer.close()
    model.eval()
    final = catalogue_metrics(model, x)
    summary = {"steps": step, "epochs": cfg.epochs, "dead_code_restarts": restarts, "final_losses": last,
               "init_collision_rate": init_metrics["collision_rate"], "final_collision_rate": final["collision_rate"],
               "final_usage": final["usage"], "final_perplexity": final["perplexity"]}
    return model, summary
