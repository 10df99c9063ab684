"""VAE latents of every item image, computed once per catalogue and stored next to the shards (UTGRec Eq. 9
targets).

    python -m megarec.methods.utgrec.latent_cache SHARDS --vae VAE_PATH [--out FILE] [--image_size 256] [--patch 2]
    torchrun --nproc_per_node 8 -m megarec.methods.utgrec.latent_cache SHARDS --vae VAE_PATH   # one slice per rank

One safetensors file: ``latents [M, |V|, C p^2]`` (float16; the scaled latents are of unit scale) for
the M items that have an image, metadata ``item_keys`` (JSON list, row order), ``vae`` (the path),
``vae_hash`` (:func:`vae_fingerprint`: the VAE's config and weight files), ``image_size``, ``patch``.
The default file is ``SHARDS/latents-<vae hash>-<size>px-p<patch>.safetensors`` (:func:`default_cache_path`).

Training reads rows by key (memory-mapped, in the DataLoader workers) instead of running the VAE every step:
with ``utgrec.decoder.vae_path`` and ``decoder.cache_latents`` (default on) the run makes the default file
first when it is missing (every rank encodes its slice of the catalogue, :func:`write_latent_cache`), or
reads ``decoder.latents_file``. A file made with another VAE (other hash), image size or latent patch than
the config's is a :class:`DataError` before anything is computed (:func:`check_latent_cache`). Images are
read at ``image_size`` straight from the stored bytes (not from the encoder's resized image). Items not in
the file have no image target.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megarec.data.domain import DataError

FORMAT = "megarec-latents/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def vae_fingerprint(path: str | Path) -> str:
    """A hash of the VAE at ``path``: its ``config.json`` and weight files (a local folder), else of the hub id."""
    h = hashlib.blake2b(digest_size=16)
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    else:
        h.update(f"hub:{path}".encode())
    return h.hexdigest()


def default_cache_path(shards: str | Path, vae_path: str, image_size: int, patch: int) -> Path:
    shards = Path(shards)
    folder = shards if shards.is_dir() else shards.parent
    return folder / f"latents-{vae_fingerprint(vae_path)[:12]}-{image_size}px-p{patch}.safetensors"


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def check_latent_cache(path: str | Path, vae_path: str = "", image_size: int | None = None,
                       patch: int | None = None) -> dict:
    """The metadata of the latents file ``path``; :class:`DataError` when it is no latents file or was made with
    another VAE (``vae_path``'s hash), image size or latent patch than asked. Reads the header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no latents file (write one with `python -m megarec.methods.utgrec.latent_cache`)")
    try:
        meta = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"{path}: not a safetensors latents file ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    wrong = []
    if vae_path and meta.get("vae_hash") and meta["vae_hash"] != vae_fingerprint(vae_path):
        wrong.append(f"VAE {meta.get('vae')!r} (hash {meta['vae_hash'][:12]}), not utgrec.decoder.vae_path "
                     f"{vae_path!r} (hash {vae_fingerprint(vae_path)[:12]})")
    if image_size is not None and int(meta.get("image_size", -1)) != int(image_size):
        wrong.append(f"image size {meta.get('image_size')}, not utgrec.decoder.vae_image_size {image_size}")
    if patch is not None and int(meta.get("patch", -1)) != int(patch):
        wrong.append(f"latent patch {meta.get('patch')}, not utgrec.decoder.latent_patch {patch}")
    if wrong:
        raise DataError(f"{path}: latents made with another setup: {'; '.join(wrong)}. Remake the cache "
                        "(python -m megarec.methods.utgrec.latent_cache) or point decoder.latents_file elsewhere")
    return meta


@torch.no_grad()
def write_latent_cache(shards: str | Path, vae_path: str, out: str | Path | None = None, image_size: int = 256,
                       patch: int = 2, batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                       vae=None, lookup=None, rank: int | None = None, world_size: int | None = None,
                       on_bad_sample: str = "fail", token: str | None = None) -> Path:
    """Encode every item image of ``shards`` with the ``AutoencoderKL`` at ``vae_path`` (or the loaded
    ``ImageLatents`` ``vae``); write ``out`` (default :func:`default_cache_path`). Images are read in batches
    (one pass per shard) at ``image_size`` from their stored bytes. Under ``torch.distributed`` (or with
    ``rank`` / ``world_size``) every rank encodes its contiguous slice and writes a part file next to ``out``;
    rank 0 joins them (a shared file system, as the shards are); a collective then. Part and temporary files
    carry a ``token`` drawn per write (rank 0's, broadcast), so jobs that share a shards directory and encode it at the same time
    never touch each other's files (the last complete file wins). ``on_bad_sample="skip"``
    leaves undecodable images out (no image target), ``"fail"`` raises."""
    from megarec.distributed import barrier, broadcast_object, get_rank, get_world_size, is_dist
    from megarec.methods.utgrec.image_decoder import ImageLatents
    from megarec.methods.utgrec.item_lookup import ItemLookup

    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    lookup = lookup if lookup is not None else ItemLookup(shards)
    out = Path(out) if out else default_cache_path(shards, vae_path, image_size, patch)
    rows = [i for i in range(len(lookup)) if lookup.has_image(i)]
    if not rows:
        raise DataError(f"{shards}: no item has an image; nothing to encode")
    if on_bad_sample == "skip":   # undecodable images get no row (no image target), as in training
        rows = [i for i in rows if _decodable(lookup, i, image_size)]
    if vae is None:
        vae = ImageLatents(vae_path, image_size, patch).to(device)
    per = -(-len(rows) // world)
    mine = rows[rank * per:(rank + 1) * per]
    chunks = [torch.zeros(0, vae.num_tokens, vae.token_dim, dtype=torch.float16)]
    for s in tqdm(range(0, len(mine), batch_size), desc=f"latents (rank {rank})", disable=not progress):
        part = mine[s:s + batch_size]
        ims = [lookup.decode(i, b, image_size) for i, b in zip(part, lookup.image_bytes(part))]
        chunks.append(vae(torch.stack(ims).to(device)).half().cpu())
    mine_lat = torch.cat(chunks).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "item_keys": json.dumps([lookup.keys[i] for i in rows]), "vae": str(vae_path),
            "vae_hash": vae_fingerprint(vae_path), "image_size": str(image_size), "patch": str(patch)}
    if token is None:   # one per write, the same on every rank (no process group: this process's calls are the ranks)
        token = broadcast_object(uuid.uuid4().hex[:12]) if is_dist() else f"pid{os.getpid()}"
    if world == 1:
        _save(out, mine_lat, meta, token)
        return out
    parts = [out.with_name(f"{out.name}.{token}.part{r}of{world}") for r in range(world)]
    save_file({"latents": mine_lat}, str(parts[rank]))
    barrier()
    if rank == 0:
        full = []
        for p in parts:
            with safe_open(str(p), framework="pt") as fh:
                full.append(fh.get_tensor("latents"))
        _save(out, torch.cat(full).contiguous(), meta, token)
        for p in parts:
            p.unlink()
    barrier()
    return out


def _decodable(lookup, i: int, size: int) -> bool:
    try:
        lookup.image(i, size)
        return True
    except DataError:
        return False


def _save(out: Path, latents: torch.Tensor, meta: dict, token: str) -> None:
    tmp = out.with_name(f"{out.name}.{token}.tmp")
    save_file({"latents": latents}, str(tmp), metadata=meta)
    tmp.replace(out)


class LatentCache:
    """Rows of a latents file by item key; ``num_tokens`` / ``token_dim`` like :class:`ImageLatents`.

    The rows are memory-mapped lazily in the process that reads them (a DataLoader worker maps the file
    itself; pickling carries only the path and the index), and a batch is one sorted gather."""

    def __init__(self, path: str | Path, vae_path: str = "", image_size: int | None = None,
                 patch: int | None = None) -> None:
        self.path = Path(path)
        meta = check_latent_cache(self.path, vae_path, image_size, patch)
        self.index = {k: i for i, k in enumerate(json.loads(meta["item_keys"]))}
        self.image_size, self.patch, self.vae_hash = int(meta["image_size"]), int(meta["patch"]), meta.get("vae_hash")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        info = header["latents"]
        if info["dtype"] != "F16" or len(info["shape"]) != 3:
            raise DataError(f"{path}: 'latents' must be a float16 [M, |V|, C] tensor, got {info['dtype']} "
                            f"{info['shape']}")
        self._shape = tuple(info["shape"])
        self._offset = 8 + n + int(info["data_offsets"][0])
        _, self.num_tokens, self.token_dim = self._shape
        self._rows, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_pid": None}

    def _mapped(self) -> np.ndarray:
        if self._rows is None or self._pid != os.getpid():
            self._rows = np.memmap(self.path, dtype=np.float16, mode="r", offset=self._offset, shape=self._shape)
            self._pid = os.getpid()
        return self._rows

    def __len__(self) -> int:
        return self._shape[0]

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents [B, |V|, C] float32, has_image [B])``; zeros for keys without a row."""
        out = torch.zeros(len(keys), self.num_tokens, self.token_dim)
        rows = [self.index.get(k, -1) for k in keys]
        has = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        if has.any():
            sel = np.array([r for r in rows if r >= 0])
            order = np.argsort(sel, kind="stable")
            got = np.empty((len(sel), self.num_tokens, self.token_dim), dtype=np.float16)
            got[order] = self._mapped()[sel[order]]
            out[has] = torch.from_numpy(got).float()
        return out, has


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megarec.methods.utgrec.latent_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="item shard folder")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder or hub id")
    p.add_argument("--out", default="", help="latents file to write (.safetensors; default: in the shard folder, "
                                             "named by the VAE's hash, size and patch)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="")
    a = p.parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        from megarec.engine.deepspeed_setup import init_distributed

        init_distributed()
    dev = a.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    path = write_latent_cache(a.shards, a.vae, a.out or None, a.image_size, a.patch, a.batch_size, dev)
    print(f"latents written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
