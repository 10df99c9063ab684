"""ETEGRec's data side: per-batch tokenisation from the current codes, code regeneration and
its statistics, and the pipeline stages that produce its inputs (SASRec teacher embeddings,
pre-trained RQ-VAE); see :mod:`megarec.methods.etegrec`.

Codes change after every tokenizer epoch, so samples keep item indices and look up each
item's tokens at batch time from the model's ``item_codes`` buffer: a regeneration (or a
checkpoint load) applies at once, with no re-encoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from megarec.config import TokenizerConfig, load_config
from megarec.data.code_vocab import EOS, PAD, CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain, MultiDomain
from megarec.data.splits import Samples
from megarec.tokenizer.assign import CollisionError, assign_catalogue, collision_rate, level_stats
from megarec.tokenizer.rqvae import RQVAE
from megarec.tokenizer.zero import broadcast_

if TYPE_CHECKING:
    from megarec.methods.etegrec import ETEGRecConfig
    from megarec.train_rec import TrainRecConfig
    from megarec.methods.etegrec_model import ETEGRecModel


# --------------------------------------------------------------------------- samples
class CodeTable:
    """Item index -> token ids ``[N, L]`` from the model's current codes (read at every batch)."""

    def __init__(self, vocab: CodeVocab, codes: torch.Tensor) -> None:
        self.vocab = vocab
        self.offsets = torch.as_tensor(vocab.offsets, dtype=torch.long)
        self.codes = codes                    # before the model exists
        self.model: ETEGRecModel | None = None

    def tokens(self, device: torch.device | str) -> torch.Tensor:
        codes = self.model.item_codes if self.model is not None else self.codes
        return codes.to(device) + self.offsets.to(device)


@dataclass
class HistorySamples:
    """(history, target) pairs as global item indices; tokens are looked up per batch, so
    regenerated codes apply at once. Rows: items oldest first, right-padded with -1."""

    items: torch.Tensor       # [n, max_len] int64
    counts: np.ndarray        # [n] items per history
    targets: torch.Tensor     # [n]
    table: CodeTable

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def lengths(self) -> np.ndarray:
        """Encoder tokens per row (L per item + EOS)."""
        return self.counts * self.table.vocab.num_levels + 1

    def batch(self, indices: np.ndarray | Sequence[int], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Encoder ids as :meth:`CodeVocab.encode_histories` writes them (codes, EOS, PAD), labels, targets."""
        idx = np.asarray(indices, dtype=np.int64)
        width = int(self.counts[idx].max())
        t = torch.from_numpy(idx)
        items = self.items.index_select(0, t)[:, :width].to(device)
        targets = self.targets.index_select(0, t).to(device)
        tokens = self.table.tokens(device)
        L = tokens.shape[1]
        valid = items >= 0
        ids = torch.where(valid[..., None], tokens[items.clamp(min=0)], PAD).reshape(len(idx), width * L)
        ids = torch.cat([ids, ids.new_full((len(idx), 1), PAD)], dim=1)
        ids.scatter_(1, valid.sum(1, keepdim=True) * L, EOS)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": tokens[targets],
                "targets": targets}


def history_samples(samples: Samples, offset: int, max_len: int, table: CodeTable) -> HistorySamples:
    hist = [np.asarray(h, dtype=np.int64)[-max_len:] + offset for h in samples.histories]
    counts = np.array([len(h) for h in hist], dtype=np.int64)
    items = torch.full((len(hist), max(1, int(counts.max(initial=1)))), -1, dtype=torch.long)
    for i, h in enumerate(hist):
        items[i, :len(h)] = torch.from_numpy(h)
    return HistorySamples(items, counts, torch.from_numpy(np.asarray(samples.targets, dtype=np.int64) + offset),
                          table)


def concat_history_samples(parts: Sequence[HistorySamples]) -> HistorySamples:
    width = max(p.items.shape[1] for p in parts)
    items = torch.cat([torch.nn.functional.pad(p.items, (0, width - p.items.shape[1]), value=-1) for p in parts])
    return HistorySamples(items, np.concatenate([p.counts for p in parts]), torch.cat([p.targets for p in parts]),
                          parts[0].table)


# --------------------------------------------------------------------------- codes
def vocab_sizes(tokenizer: RQVAE, s: "ETEGRecConfig") -> list[int]:
    """Code levels of the recommender's vocabulary: the RQ-VAE's, plus the fixed dedup level."""
    return list(tokenizer.codebook_sizes) + ([s.collision_codes] if s.collisions == "dedup" else [])


@torch.no_grad()
def item_codes(tokenizer: RQVAE, item_emb: torch.Tensor, item_keys: Sequence[str], s: "ETEGRecConfig",
               section: str = "etegrec") -> tuple[torch.Tensor, dict[str, Any]]:
    """Every item's collision-free codes ``[N, L']`` under ``s.collisions`` (a collective under
    ZeRO-3: call on every rank), identical on every rank (rank 0's are broadcast); ``section``:
    the run-config section of ``s``, named in errors."""
    was = tokenizer.training
    tokenizer.eval()
    try:
        cf = assign_catalogue(tokenizer, item_emb, list(item_keys), s.collisions, batch_size=s.codes_batch_size,
                              device=item_emb.device)
    finally:
        tokenizer.train(was)
    if s.collisions == "dedup" and cf.codebook_sizes[-1] > s.collision_codes:
        raise CollisionError(f"{cf.codebook_sizes[-1]} items share one ID but {section}.collision_codes is "
                             f"{s.collision_codes}: raise it or use {section}.collisions: utgrec")
    codes = broadcast_(torch.from_numpy(cf.codes).to(item_emb.device))
    return codes, cf.stats


def code_stats(old: torch.Tensor, new: torch.Tensor, sizes: Sequence[int], stats: dict[str, Any]
               ) -> dict[str, float]:
    """``codebook/*`` scalars after a regeneration: per-level usage and perplexity (before the
    collision level), collision rate before resolution, and the code change rate."""
    n_rq = len(stats["levels_before"])
    out = {"collision_rate": float(stats["collision_rate_before"]),
           "change_rate": float((old != new).any(1).float().mean()),
           "collision_rate_after": collision_rate(new.cpu().numpy())}
    for level, st in enumerate(level_stats(new.cpu().numpy()[:, :n_rq], sizes[:n_rq])):
        out[f"usage_l{level + 1}"] = st["usage"]
        out[f"perplexity_l{level + 1}"] = st["perplexity"]
        out[f"change_rate_l{level + 1}"] = float((old[:, level] != new[:, level]).float().mean())
    return out


# --------------------------------------------------------------------------- pipeline stages
def _as_arg(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def teacher_embeddings(cfg: "TrainRecConfig", out_dir: Path, settings: Sequence[tuple[str, Any]],
                       progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the SASRec teacher on the run's domains and export its item embeddings
    (``out_dir/sasrec_embeddings.safetensors``). ``settings``: the ``teacher`` stage's keys:
    ``profile`` (the SASRec profile, default ``cpu-small``) and any ``train_rec.py`` keys of the
    SASRec run. Reused when ``out_dir`` holds a teacher trained with the same settings; other
    settings there are a ConfigError (the folder is never overwritten)."""
    from megarec.config import ConfigError, to_dict
    from megarec.recommender.sasrec import export_item_embeddings
    from megarec.tokenizer.commands import settings_fingerprint
    from megarec.train_rec import load_trained, pipeline_config, run   # the stage is a whole training run

    opts = dict(settings)
    profile = str(opts.pop("profile", "cpu-small"))
    base = [("train.seed", str(cfg.train.seed)), ("data.max_len", str(cfg.data.max_len))]
    if cfg.data.kcore is not None:
        base.append(("data.kcore", str(cfg.data.kcore)))
    if cfg.data.max_users:
        base.append(("data.max_users", str(cfg.data.max_users)))   # the teacher sees the run's users
    tcfg = pipeline_config("sasrec", cfg.data.paths, out_dir, profile,
                           base + [(k, _as_arg(v)) for k, v in opts.items()], progress)
    fingerprint = settings_fingerprint({k: v for k, v in to_dict(tcfg).items() if k != "train"}
                                       | {"train": {k: v for k, v in to_dict(tcfg)["train"].items()
                                                    if k not in ("run_dir", "progress", "cpu_threads")}})
    path, stamp = out_dir / "sasrec_embeddings.safetensors", out_dir / "teacher_settings.sha256"
    if stamp.is_file():
        if stamp.read_text().strip() != fingerprint:
            raise ConfigError(f"{out_dir} holds a SASRec teacher trained with other settings: delete the folder "
                              "or give etegrec.embeddings")
        if path.is_file():
            return path, {"reused": str(path)}
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    result = run(tcfg) if not (Path(tcfg.train.run_dir) / "metrics.json").is_file() else {}
    trained = load_trained(tcfg.train.run_dir)
    export_item_embeddings(trained.recommender.ranker.model, trained.item_keys(), path)
    return path, {"test": result.get("test"), "best_epoch": result.get("best_epoch"), "run_dir": tcfg.train.run_dir}


def pretrain_tokenizer(cfg: "TrainRecConfig", domains: Sequence[Domain], out_dir: Path,
                       settings: Sequence[tuple[str, Any]], progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Pre-train the RQ-VAE on the teacher's embeddings of every domain's items, in ``out_dir``
    (``megarec train-tokenizer PATHS --embeddings``; reused when made with the same settings and
    embeddings). ``settings``: ``megarec train-tokenizer`` keys (the ``tokenizer`` stage)."""
    from megarec.tokenizer.commands import codes_for

    tok_cfg = load_config(TokenizerConfig, None, [("seed", str(cfg.train.seed)),
                                                  ("collisions", cfg.etegrec.collisions)]
                          + [(k, _as_arg(v)) for k, v in settings])
    _, stats = codes_for(list(domains), tok_cfg, out_dir, cfg.etegrec.embeddings, progress=progress)
    return out_dir, stats


# --------------------------------------------------------------------------- inference (ETEGRec, UniGRec)
def trained_codes(state: dict[str, torch.Tensor], multi: MultiDomain, collisions: str, collision_codes: int,
                  method: str) -> CodesFile:
    """The codes a trained joint model was selected with (its ``item_codes`` buffer) as a codes file; the
    vocabulary is its tokenizer's codebooks plus, with the ``dedup`` policy, the collision level."""
    if "item_codes" not in state:
        raise DataError(f"the trained model has no item_codes: not a {method} model")
    codes = state["item_codes"].long().numpy()
    if len(codes) != multi.num_items:
        raise DataError(f"the model holds codes for {len(codes)} items, the data has {multi.num_items}")
    levels = sum(1 for k in state if k.startswith("tokenizer.quantizer.codebook_"))
    sizes = [int(state[f"tokenizer.quantizer.codebook_{i}"].shape[0]) for i in range(levels)]
    dedup = collisions == "dedup"
    return CodesFile(multi.item_keys(), codes, sizes + ([collision_codes] if dedup else []), dedup_level=dedup,
                     stats={"source": method, "codes_epoch": int(state.get("codes_epoch", torch.tensor(-1)))})


def trained_recommender(t5: Any, state: dict[str, torch.Tensor], codes: CodesFile, candidates: np.ndarray,
                        max_len: int, beam_size: int):
    """The trained T5 (the ``recommender.*`` weights of ``state``) ranking by trie-constrained beam search
    over ``codes``."""
    from megarec.engine.checkpoint import load_state_dict_into
    from megarec.methods.tiger import TigerRecommender
    from megarec.recommender.t5 import GenerativeRecommender

    vocab = CodeVocab(codes.codebook_sizes)
    model = GenerativeRecommender(t5, vocab)
    prefix = "recommender."
    load_state_dict_into(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                         source="the trained model")
    return TigerRecommender(model, candidates, vocab.item_tokens(codes.codes), max_len, beam_size)
