"""Shared fixtures of the UTGRec tests: small multi-domain item shards with placeholder images, tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.tiny_models import save_tiny_qwen2vl, save_tiny_vae


def write_sample_domains(root: Path, n_items: int = 24, n_users: int = 30) -> list[Path]:
    """Two json-layout domains with the first ``n_items`` real item texts of the embedded sample's Scientific and
    Office, and users that walk the items in order (so co-occurrence positives are neighbours)."""
    from megarec.data.sample import SAMPLE_DIR

    paths = []
    for name in ("Scientific", "Office"):
        items = json.loads((SAMPLE_DIR / name / f"{name}.item.json").read_text())
        keep = list(items)[:n_items]
        rng = np.random.default_rng(len(name))
        inter = {}
        for u in range(n_users):
            start, length = int(rng.integers(n_items)), int(rng.integers(5, 8))
            inter[f"u{u}"] = [keep[(start + k) % n_items] for k in range(length)]
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.inter.json").write_text(json.dumps(inter))
        (d / f"{name}.item.json").write_text(json.dumps({k: items[k] for k in keep}))
        paths.append(d)
    return paths


def write_sample_shards(root: Path, n_items: int = 24, image_size: int = 28, image_every: int = 1) -> Path:
    """Item shards of :func:`write_sample_domains` with placeholder images stored at ``image_size``; with
    ``image_every > 1`` only every ``image_every``-th item has an image (the others are text-only)."""
    from megarec.data.images import placeholder_bytes
    from megarec.data.readers import read_domain
    from megarec.data.shards import write_shards

    domains = [read_domain(p) for p in write_sample_domains(root / "domains", n_items)]
    out = root / "shards"
    if image_every == 1:
        write_shards(domains, out, max_count=10, images="placeholder", placeholder_size=64, image_size=image_size)
        return out
    (root / "images").mkdir(exist_ok=True)
    for d in domains:
        d.item_image = [None] * d.num_items
        for i in range(0, d.num_items, image_every):
            f = root / "images" / f"{d.name}_{i}.jpg"
            f.write_bytes(placeholder_bytes(f"{d.name}/{d.item_ids[i]}", 64))
            d.item_image[i] = str(f)
    write_shards(domains, out, max_count=10, images="files", image_size=image_size)
    return out


def tiny_overrides(qwen: Path | None, vae: Path | None) -> list[tuple[str, str]]:
    """``utgrec.*`` keys for a seconds-long model: tiny codebooks and decoders."""
    o = [("utgrec.codebook.root_size", "8"), ("utgrec.codebook.leaf_size", "64"), ("utgrec.codebook.dim", "8"),
         ("utgrec.codebook.adapter_hidden", "16"), ("utgrec.decoder.heads", "2"),
         ("utgrec.decoder.diffusion_width", "16"), ("utgrec.decoder.diffusion_depth", "1"),
         ("utgrec.decoder.max_text_tokens", "16"), ("utgrec.encoder.max_text_tokens", "16"),
         ("utgrec.decoder.samples_per_token", "2")]
    if qwen is not None:
        o += [("utgrec.encoder.backend", "qwen2vl"), ("utgrec.encoder.path", str(qwen)),
              ("utgrec.encoder.image_size", "28")]
    else:
        o += [("utgrec.encoder.backend", "text")]
    if vae is not None:
        o += [("utgrec.decoder.vae_path", str(vae)), ("utgrec.decoder.vae_image_size", "16")]
    return o


def tiny_models(root: Path) -> tuple[Path, Path]:
    return save_tiny_qwen2vl(root / "qwen2vl"), save_tiny_vae(root / "vae")
