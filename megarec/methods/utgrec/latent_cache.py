"""VAE latents of every item image, computed once and stored next to the shards (UTGRec Eq. 9 targets).

    python -m megarec.methods.utgrec.latent_cache SHARDS --vae VAE_PATH --out SHARDS/latents.safetensors \
        [--image_size 256] [--patch 2]

One safetensors file: ``latents [M, |V|, C p^2]`` (float16; the scaled latents are of unit scale) for
the M items that have an image, metadata ``item_keys`` (JSON list, row order), ``vae``, ``image_size``,
``patch``. Training with ``utgrec.decoder.latents_file`` reads rows by key (memory-mapped) instead of
running the VAE every step; items not in the file have no image target.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megarec.data.domain import DataError

FORMAT = "megarec-latents/1"


@torch.no_grad()
def write_latent_cache(shards: str | Path, vae_path: str, out: str | Path, image_size: int = 256, patch: int = 2,
                       batch_size: int = 32, device: str = "cpu", progress: bool = True) -> Path:
    """Encode every item image of ``shards`` with the ``AutoencoderKL`` at ``vae_path``; write ``out``."""
    from megarec.methods.utgrec.image_decoder import ImageLatents
    from megarec.methods.utgrec.item_lookup import ItemLookup

    lookup = ItemLookup(shards)
    vae = ImageLatents(vae_path, image_size, patch).to(device)
    rows = [i for i in range(len(lookup)) if lookup.has_image(i)]
    if not rows:
        raise DataError(f"{shards}: no item has an image; nothing to encode")
    chunks = []
    for s in tqdm(range(0, len(rows), batch_size), desc="latents", disable=not progress):
        ims = torch.stack([lookup.image(i, image_size) for i in rows[s:s + batch_size]]).to(device)
        chunks.append(vae(ims).half().cpu())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "item_keys": json.dumps([lookup.keys[i] for i in rows]), "vae": str(vae_path),
            "image_size": str(image_size), "patch": str(patch)}
    tmp = out.with_suffix(".tmp")
    save_file({"latents": torch.cat(chunks).contiguous()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


class LatentCache:
    """Rows of a latents file by item key; ``num_tokens`` / ``token_dim`` like :class:`ImageLatents`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{path}: no latents file (write one with `python -m megarec.methods.utgrec.latent_cache`)")
        self._fh = safe_open(str(self.path), framework="pt")
        meta = self._fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.index = {k: i for i, k in enumerate(json.loads(meta["item_keys"]))}
        self._latents = self._fh.get_slice("latents")
        _, self.num_tokens, self.token_dim = self._latents.get_shape()
        self.image_size, self.patch = int(meta["image_size"]), int(meta["patch"])

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents [B, |V|, C] float32, has_image [B])``; zeros for keys without a row."""
        out = torch.zeros(len(keys), self.num_tokens, self.token_dim)
        has = torch.tensor([k in self.index for k in keys], dtype=torch.bool)
        for j, k in enumerate(keys):
            if has[j]:
                i = self.index[k]
                out[j] = self._latents[i:i + 1][0].float()
        return out, has


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megarec.methods.utgrec.latent_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="item shard folder")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder or hub id")
    p.add_argument("--out", required=True, help="latents file to write (.safetensors)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    path = write_latent_cache(a.shards, a.vae, a.out, a.image_size, a.patch, a.batch_size, a.device)
    print(f"latents written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
