"""The steps behind ``megarec train-tokenizer`` and ``megarec tokenize``.

A trained tokenizer folder holds::

    model.safetensors          RQ-VAE weights and buffers (format megarec-rqvae/1)
    config.yaml                the TokenizerConfig it was trained with
    text_embeddings/<D>.safetensors   cached text embeddings of domain D (text input only)
    codes.safetensors          codes of the training domains (megarec-codes/1), one code space
    stats.json                 training summary + code statistics + the settings that made the codes
    tb/                        TensorBoard logs

Several domains share one code space: one RQ-VAE is trained on all their items
and the codes of all items are assigned together, so the collision policy makes
every ID unique over the merged catalogue (keys ``"<domain>/<item id>"``).

The codes file records the settings that produced it (``stats["settings"]``:
the TokenizerConfig, the domains with their item counts and digests, the input
kind); :func:`codes_for` reuses an existing codes file only when they are equal.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from megarec.config import TokenizerConfig, to_dict
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.distributed import get_logger
from megarec.tokenizer.assign import assign_catalogue
from megarec.tokenizer.encoders import collaborative_embeddings, text_embeddings
from megarec.tokenizer.rqvae import RQVAE
from megarec.tokenizer.train import resolve_device, train_rqvae

CODES = "codes.safetensors"
SETTINGS_FORMAT = "megarec-codes-settings/1"
# TokenizerConfig keys that say where the tokenizer ran, not what it computes: they do not invalidate codes.
NOT_SETTINGS = ("device",)

Domains = Domain | Sequence[Domain]


# --------------------------------------------------------------------------- inputs
def as_domains(domains: Domains) -> list[Domain]:
    """One domain or several as a list; a clear error for none or for repeated domain names."""
    ds = [domains] if isinstance(domains, Domain) else list(domains)
    if not ds:
        raise DataError("no domains given")
    MultiDomain(ds)  # raises DataError on repeated names (their item keys would clash)
    return ds


def catalogue_keys(domains: Domains) -> list[str]:
    """Item keys ``"<domain>/<item id>"`` of every item of every domain, in domain then item order."""
    return MultiDomain(as_domains(domains)).item_keys()


def check_inputs(cfg: TokenizerConfig, embeddings: str | Path | None) -> None:
    """The tokenizer's input exists (the embeddings file, else the text encoder), before any work or output."""
    from megarec.tokenizer.encoders import default_encoder_path

    if embeddings is not None:
        if not Path(embeddings).is_file():
            raise DataError(f"embeddings file {embeddings} does not exist")
    elif cfg.encoder:
        if not Path(cfg.encoder).exists():
            raise DataError(f"encoder: text encoder {cfg.encoder} does not exist")
    else:
        default_encoder_path()   # DataError when the bundled encoder is not installed


def tokenizer_inputs(domain: Domain, cfg: TokenizerConfig, folder: Path, embeddings: str | Path | None,
                     who: str) -> torch.Tensor:
    """Collaborative embeddings from ``embeddings`` when given, else the domain's (cached) text embeddings."""
    if embeddings is not None:
        return collaborative_embeddings(embeddings, domain)
    return text_embeddings(domain, cfg.encoder or None, cfg.text_fields, cache=folder / "text_embeddings" /
                           f"{domain.name}.safetensors", who=who, batch_size=cfg.encoder_batch_size,
                           max_length=cfg.max_text_length, normalize=cfg.normalize,
                           device=resolve_device(cfg.device))


def catalogue_inputs(domains: Sequence[Domain], cfg: TokenizerConfig, folder: Path, embeddings: str | Path | None,
                     who: str) -> torch.Tensor:
    """Tokenizer inputs of every item of every domain, concatenated in :func:`catalogue_keys` order.

    With ``embeddings``, one file holds the items of all domains (keys ``"<domain>/<item id>"``).
    """
    parts = [tokenizer_inputs(d, cfg, folder, embeddings, who) for d in domains]
    dims = {d.name: x.shape[1] for d, x in zip(domains, parts)}
    if len(set(dims.values())) > 1:
        raise DataError(f"tokenizer inputs of the domains have different dimensions: {dims}")
    return torch.cat([x.float() for x in parts])


# --------------------------------------------------------------------------- settings
def _digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (a clear error when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def codes_settings(cfg: TokenizerConfig, domains: Domains, embeddings: str | Path | None = None) -> dict[str, Any]:
    """Everything that determines a tokenizer's codes: the TokenizerConfig (less :data:`NOT_SETTINGS`),
    the input kind (text, or the embeddings file's content digest) and, per domain, its name, item
    count and digests of its item ids and (text input) item texts."""
    tok = to_dict(cfg)
    for k in NOT_SETTINGS:
        tok.pop(k, None)
    text = embeddings is None
    doms = []
    for d in as_domains(domains):
        entry: dict[str, Any] = {"name": d.name, "items": d.num_items, "item_ids_sha256": _digest(d.item_ids)}
        if text:
            entry["texts_sha256"] = _digest(d.texts(cfg.text_fields)) if d.has_text else None
        doms.append(entry)
    return {"format": SETTINGS_FORMAT, "tokenizer": tok, "input": "text" if text else "embeddings",
            "embeddings_sha256": None if text else file_digest(embeddings), "domains": doms}


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a settings dict."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def codes_settings_fingerprint(cfg: TokenizerConfig, domains: Domains, embeddings: str | Path | None = None) -> str:
    """Fingerprint of :func:`codes_settings`: equal exactly when the codes would be made the same way."""
    return settings_fingerprint(codes_settings(cfg, domains, embeddings))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(v, dict) and "name" in v for v in d):
        return _flatten({v["name"]: v for v in d}, prefix)
    return {prefix[:-1]: d}


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences ``"key: old -> new"`` between two settings dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def reusable_codes(out_dir: str | Path, settings: dict[str, Any]) -> CodesFile | None:
    """The codes file ``out_dir/codes.safetensors`` if it was made with exactly ``settings``, else ``None``.

    Logs why an existing file is not reused (unreadable, no settings recorded, or which settings differ).
    """
    path = Path(out_dir) / CODES
    if not path.is_file():
        return None
    log = get_logger()
    try:
        codes = CodesFile.load(path)
    except DataError as e:
        log.info("not reusing %s: %s", path, e)
        return None
    old = codes.stats.get("settings")
    if not isinstance(old, dict):
        log.info("not reusing %s: it records no tokenizer settings; retraining", path)
        return None
    if settings_fingerprint(old) != settings_fingerprint(settings):
        diff = settings_diff(old, settings)
        log.info("not reusing %s: settings changed (%s); retraining", path,
                 "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else ""))
        return None
    return codes


# --------------------------------------------------------------------------- commands
def train_tokenizer(domains: Domains, cfg: TokenizerConfig, out_dir: str | Path,
                    embeddings: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one RQ-VAE on the items of all ``domains``, save it, write one codes file and ``stats.json``.

    The codes of all items are assigned together (``cfg.collisions``), so IDs are unique over the
    merged catalogue. The codes file's ``stats["settings"]`` records what made it
    (:func:`codes_settings`). Returns the stats.
    """
    ds = as_domains(domains)
    check_inputs(cfg, embeddings)
    settings = codes_settings(cfg, ds, embeddings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CODES).unlink(missing_ok=True)      # never leave old codes next to a new (or half-trained) model
    x = catalogue_inputs(ds, cfg, out, embeddings, "train-tokenizer")
    model, summary = train_rqvae(x, cfg, log_dir=out / "tb", progress=progress)
    extra = {"input": "embeddings" if embeddings is not None else "text", "domains": [d.name for d in ds],
             "domain": ds[0].name if len(ds) == 1 else None,
             "embeddings": str(embeddings) if embeddings is not None else None}
    model.save(out, cfg, extra)
    codes = assign_catalogue(model, x, catalogue_keys(ds), cfg.collisions, device=next(model.parameters()).device)
    codes.stats["domains"] = {d.name: d.num_items for d in ds}
    codes.stats["training"] = summary
    codes.stats["settings"] = settings
    codes.stats["settings_fingerprint"] = settings_fingerprint(settings)
    codes.save(out / CODES)
    (out / "stats.json").write_text(json.dumps(codes.stats, indent=2))
    return codes.stats


def tokenize(model_dir: str | Path, domains: Domains, out: str | Path, policy: str | None = None,
             embeddings: str | Path | None = None) -> CodesFile:
    """Codes for every item of ``domains`` with a trained tokenizer; writes one codes file ``out``.

    Collisions are resolved over all the domains' items together, so IDs are unique across them.
    """
    ds = as_domains(domains)
    model_dir = Path(model_dir)
    model, cfg, extra = RQVAE.load(model_dir)
    model.to(resolve_device(cfg.device))
    if extra.get("input") == "embeddings" and embeddings is None:
        raise DataError(f"the tokenizer in {model_dir} was trained on item embeddings ({extra.get('embeddings')}); "
                        "pass --embeddings FILE with the same kind of embeddings for these domains")
    x = catalogue_inputs(ds, cfg, model_dir, embeddings, "tokenize")
    if x.shape[1] != model.in_dim:
        raise DataError(f"inputs of {'+'.join(d.name for d in ds)} have dimension {x.shape[1]} but the tokenizer "
                        f"in {model_dir} expects {model.in_dim}")
    codes = assign_catalogue(model, x, catalogue_keys(ds), policy or cfg.collisions,
                             device=next(model.parameters()).device)
    codes.stats["domains"] = {d.name: d.num_items for d in ds}
    codes.stats["tokenizer"] = str(model_dir)
    codes.save(out)
    get_logger().info("codes for %d items of %d domain(s) written to %s", len(codes.item_keys), len(ds), out)
    return codes


def codes_for(domains: Domains, cfg: TokenizerConfig, out_dir: str | Path, embeddings: str | Path | None = None,
              progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """One codes file for ``domains`` in ``out_dir`` (a tokenizer folder): reused when
    ``out_dir/codes.safetensors`` was made with the same settings, else trained
    (:func:`train_tokenizer`). Returns ``(path of the codes file, its stats)``.

    Call it on one process (it trains and writes files).
    """
    ds = as_domains(domains)
    settings = codes_settings(cfg, ds, embeddings)
    codes = reusable_codes(out_dir, settings)
    path = Path(out_dir) / CODES
    if codes is not None:
        get_logger().info("reusing %s (same tokenizer settings, %d items)", path, len(codes.item_keys))
        return path, codes.stats
    return path, train_tokenizer(ds, cfg, out_dir, embeddings, progress=progress)


def summary_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level (usage, perplexity, entropy) for a printed table."""
    return [{"level": i + 1, **s} for i, s in enumerate(stats["levels"])]


def domains_summary(stats: dict[str, Any]) -> str | None:
    """With several domains: their item counts and how many items shared an ID across domains before resolution."""
    if len(stats.get("domains", {})) <= 1:
        return None
    return (f"{len(stats['domains'])} domains in one code space ("
            + ", ".join(f"{n}: {k:,} items" for n, k in stats["domains"].items())
            + f"); items sharing an ID with another domain's item before resolution: "
            f"{stats.get('cross_domain_collision_rate_before', 0.0):.4f}")


def stage_codes(domains: Sequence[Domain], out_dir: str | Path, settings: Sequence[tuple[str, Any]],
                base: Sequence[tuple[str, str]] = (), forced: Sequence[tuple[str, str]] = (),
                embeddings: str | Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """A method's RQ-VAE pipeline stage: the TokenizerConfig of ``base`` (the method's defaults, e.g. the
    run's seed) < ``settings`` (a profile's ``stages.tokenizer`` keys, YAML values) < ``forced``, then
    :func:`codes_for` in ``out_dir`` (reused when made with the same settings)."""
    from megarec.config import load_config, override_value

    cfg = load_config(TokenizerConfig, None, [*base, *((k, override_value(v)) for k, v in settings), *forced])
    return codes_for(list(domains), cfg, out_dir, embeddings, progress=progress)
