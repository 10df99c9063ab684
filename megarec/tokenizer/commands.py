"""The steps behind ``megarec train-tokenizer`` and ``megarec tokenize``.

A trained tokenizer folder holds::

    model.safetensors          RQ-VAE weights and buffers (format megarec-rqvae/1)
    config.yaml                the TokenizerConfig it was trained with
    text_embeddings/<D>.safetensors   cached text embeddings of domain D (text input only)
    codes.safetensors          codes of the training domain (megarec-codes/1)
    stats.json                 training summary + code statistics
    tb/                        TensorBoard logs
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megarec.config import TokenizerConfig
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain
from megarec.distributed import get_logger
from megarec.tokenizer.assign import assign_catalogue
from megarec.tokenizer.encoders import collaborative_embeddings, item_keys, text_embeddings
from megarec.tokenizer.rqvae import RQVAE
from megarec.tokenizer.train import resolve_device, train_rqvae


def tokenizer_inputs(domain: Domain, cfg: TokenizerConfig, folder: Path, embeddings: str | Path | None,
                     who: str) -> torch.Tensor:
    """Collaborative embeddings from ``embeddings`` when given, else the domain's (cached) text embeddings."""
    if embeddings is not None:
        return collaborative_embeddings(embeddings, domain)
    return text_embeddings(domain, cfg.encoder or None, cfg.text_fields, cache=folder / "text_embeddings" /
                           f"{domain.name}.safetensors", who=who, batch_size=cfg.encoder_batch_size,
                           max_length=cfg.max_text_length, normalize=cfg.normalize,
                           device=resolve_device(cfg.device))


def train_tokenizer(domain: Domain, cfg: TokenizerConfig, out_dir: str | Path, embeddings: str | Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Train an RQ-VAE on ``domain``'s items, save it, write codes and ``stats.json``; returns the stats."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = tokenizer_inputs(domain, cfg, out, embeddings, "train-tokenizer")
    model, summary = train_rqvae(x, cfg, log_dir=out / "tb", progress=progress)
    extra = {"input": "embeddings" if embeddings is not None else "text", "domain": domain.name,
             "embeddings": str(embeddings) if embeddings is not None else None}
    model.save(out, cfg, extra)
    codes = assign_catalogue(model, x, item_keys(domain), cfg.collisions, device=next(model.parameters()).device)
    codes.stats["training"] = summary
    codes.save(out / "codes.safetensors")
    (out / "stats.json").write_text(json.dumps(codes.stats, indent=2))
    return codes.stats


def tokenize(model_dir: str | Path, domain: Domain, out: str | Path, policy: str | None = None,
             embeddings: str | Path | None = None) -> CodesFile:
    """Codes for every item of ``domain`` with a trained tokenizer; writes the codes file ``out``."""
    model_dir = Path(model_dir)
    model, cfg, extra = RQVAE.load(model_dir)
    model.to(resolve_device(cfg.device))
    if extra.get("input") == "embeddings" and embeddings is None:
        raise DataError(f"the tokenizer in {model_dir} was trained on item embeddings ({extra.get('embeddings')}); "
                        "pass --embeddings FILE with the same kind of embeddings for this domain")
    x = tokenizer_inputs(domain, cfg, model_dir, embeddings, "tokenize")
    if x.shape[1] != model.in_dim:
        raise DataError(f"inputs of domain {domain.name!r} have dimension {x.shape[1]} but the tokenizer in "
                        f"{model_dir} expects {model.in_dim}")
    codes = assign_catalogue(model, x, item_keys(domain), policy or cfg.collisions,
                             device=next(model.parameters()).device)
    codes.save(out)
    get_logger().info("codes for %d items written to %s", len(codes.item_keys), out)
    return codes


def summary_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level (usage, perplexity, entropy) for a printed table."""
    return [{"level": i + 1, **s} for i, s in enumerate(stats["levels"])]
