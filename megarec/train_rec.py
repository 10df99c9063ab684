"""DeepSpeed entry point: train and evaluate a recommender (``method: tiger | sasrec``).

    deepspeed megarec/train_rec.py --deepspeed ds_configs/zero3.json --config FILE [--key value ...]
    python megarec/train_rec.py --config FILE [--key value ...]     # one process, no launcher
    megarec train-rec --config FILE [--key value ...]               # the same, from the CLI

Reads every domain of ``data.paths`` (several domains = multi-domain training in
one shared item / code space), checks the codes file against the data, builds the
method's model (``--init_from`` loads weights to fine-tune), trains with AdamW and
warmup + cosine under DeepSpeed, evaluates every ``train.eval_every`` epochs,
stops early on validation NDCG@10, tests the best model and writes under
``train.run_dir``: ``config.yaml``, ``checkpoints/`` (``--resume`` continues from the
latest), ``model/`` (``model.safetensors`` + ``config.yaml`` [+ ``codes.safetensors``]),
``tb/`` and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from megarec.config import ConfigError, DataConfig, field, load_config, save_config, to_dict
from megarec.recommender.sasrec import SASRecConfig
from megarec.recommender.t5 import T5RecConfig

METHODS = {"tiger": "megarec.methods.tiger", "sasrec": "megarec.methods.sasrec"}
FORMAT = "megarec-rec/1"


@dataclasses.dataclass
class RecDataConfig(DataConfig):
    codes: str = field("", help="codes file with an ID for every item of data.paths (tiger; `megarec train-tokenizer`)")


@dataclasses.dataclass
class RecTrainConfig:
    lr: float = field(1e-3, min=0.0, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.05, min=0.0, help="AdamW weight decay")
    warmup_steps: int = field(100, min=0, help="linear warmup steps, then cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = field(0.0, min=0.0, max=1.0, help="learning rate at the end of the cosine")
    epochs: int = field(200, min=0, help="maximum epochs (early stopping usually ends sooner)")
    batch_size: int = field(256, min=1, help="training samples per rank and step")
    eval_batch_size: int = field(128, min=1, help="users per rank and evaluation batch")
    eval_every: int = field(1, min=1, help="epochs between validation passes")
    patience: int = field(10, min=0, help="validation passes without improvement before stopping (0 = never)")
    metric: str = field("ndcg@10", choices=("ndcg@10", "recall@10", "ndcg@5", "recall@5"),
                        help="validation metric for early stopping and model selection")
    beam_size: int = field(20, min=1, help="beam width of trie-constrained decoding (generative methods)")
    seed: int = field(2024, min=0)
    run_dir: str = field("runs/rec", help="output folder (checkpoints, model, tb, metrics.json)")
    deepspeed: str = field("", help="DeepSpeed config JSON (empty = built-in: ZeRO 0, fp32 on CPU, bf16 on GPU)")
    log_every: int = field(50, min=1, help="steps between loss / throughput logs (the only host syncs)")
    save_every_steps: int = field(0, min=0, help="checkpoint every N steps inside an epoch (0 = epoch ends only)")
    keep_checkpoints: int = field(2, min=1, help="newest checkpoints kept on disk")
    init_from: str = field("", help="weights to start from: model.safetensors, a model or run folder, "
                                    "or a DeepSpeed checkpoint (fine-tuning)")
    resume: bool = field(False, help="continue from the latest checkpoint in run_dir")
    progress: bool = field(True, help="tqdm progress bars on rank 0")
    cpu_threads: int = field(0, min=0, help="torch threads per rank on CPU (0 = this process's cores / ranks on "
                                            "the node, unless OMP_NUM_THREADS is set)")


@dataclasses.dataclass
class TrainRecConfig:
    method: str = field("tiger", choices=tuple(METHODS), help="recommender method")
    data: RecDataConfig = field(default_factory=RecDataConfig)
    tiger: T5RecConfig = field(default_factory=T5RecConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    train: RecTrainConfig = field(default_factory=RecTrainConfig)


# Training profiles: overrides applied on top of the defaults (tools/reproduce.py, quickstart).
# ``paper`` follows PROTOCOL.md / the papers (SASRec: RecBole's Adam at a constant 1e-3, i.e. no
# weight decay and min_lr_ratio 1); ``cpu-small`` shrinks T5 (2+2 layers, d_model 64) and the
# epoch budget (TIGER 10 epochs, SASRec 80, both with early stopping) for 2 CPU cores. Measured
# on Scientific (33.5k training samples) on a shared, loaded 2-core machine with one thread:
# SASRec ~22 s per epoch (stopped after 25 epochs, 9 min), TIGER ~150 s per epoch (25 min, plus
# ~8 min for the item-text encoder and RQ-VAE).
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "sasrec": {"train.lr": 1e-3, "train.batch_size": 256, "train.patience": 10, "train.epochs": 300,
                   "train.weight_decay": 0.0, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0},
        "tiger": {"train.lr": 3e-3, "train.batch_size": 256, "train.patience": 10, "train.epochs": 200,
                  "train.beam_size": 20, "tiger.d_kv": 64},   # ETEGRec 4.1.5: 4 heads of dimension 64
    },
    "cpu-small": {
        "sasrec": {"train.lr": 1e-3, "train.batch_size": 256, "train.patience": 10, "train.epochs": 80,
                   "train.weight_decay": 0.0, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0,
                   "train.eval_batch_size": 512},
        "tiger": {"train.lr": 3e-3, "train.batch_size": 256, "train.patience": 2, "train.epochs": 10,
                  "train.eval_every": 2, "train.beam_size": 20, "train.eval_batch_size": 256,
                  "tiger.num_layers": 2, "tiger.num_decoder_layers": 2, "tiger.d_model": 64, "tiger.d_ff": 256,
                  "tiger.num_heads": 4, "tiger.d_kv": 16},
    },
    "quickstart": {  # `megarec quickstart`: the embedded sample's small domains, about a minute per method
        "sasrec": {"train.lr": 1e-3, "train.batch_size": 64, "train.patience": 5, "train.epochs": 40,
                   "train.weight_decay": 0.0, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0,
                   "train.log_every": 10},
        "tiger": {"train.lr": 3e-3, "train.batch_size": 64, "train.patience": 2, "train.epochs": 30,
                  "train.eval_every": 5, "train.warmup_steps": 50, "train.beam_size": 20, "train.log_every": 10,
                  "tiger.num_layers": 2, "tiger.num_decoder_layers": 2, "tiger.d_model": 64, "tiger.d_ff": 256,
                  "tiger.num_heads": 4, "tiger.d_kv": 16},
    },
    "tiny": {  # tests: seconds, not quality
        "sasrec": {"train.epochs": 2, "train.batch_size": 64, "train.warmup_steps": 0, "train.log_every": 5,
                   "sasrec.hidden": 16, "sasrec.inner": 32, "sasrec.num_layers": 1},
        "tiger": {"train.epochs": 2, "train.batch_size": 64, "train.warmup_steps": 5, "train.log_every": 5,
                  "train.beam_size": 10, "tiger.num_layers": 1, "tiger.num_decoder_layers": 1, "tiger.d_model": 32,
                  "tiger.d_ff": 64, "tiger.num_heads": 2, "tiger.d_kv": 16},
    },
}


def profile_overrides(method: str, profile: str) -> list[tuple[str, str]]:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if method not in PROFILES[profile]:
        raise ConfigError(f"profile {profile!r} has no settings for method {method!r}")
    return [(k, str(v)) for k, v in PROFILES[profile][method].items()]


# --------------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _method(name: str):
    return importlib.import_module(METHODS[name])


def read_domains(cfg: DataConfig) -> list:
    """Read ``cfg.paths`` (every input error is raised here, before any compute)."""
    from megarec.data.readers import read_domain

    if not cfg.paths:
        raise ConfigError("data.paths: give at least one domain folder or file")
    return [read_domain(p, kcore=cfg.kcore, text_fields=cfg.text_fields) for p in cfg.paths]


def _set_cpu_threads(threads: int) -> None:
    """On CPU, split the cores among the node's ranks: torch's default (every core per rank)
    oversubscribes them under ``deepspeed --num_gpus N``, and OpenMP threads that wait for
    each other then run many times slower."""
    from megarec.engine.deepspeed_setup import accelerator_name

    if accelerator_name() != "cpu":
        return
    if threads == 0:
        if "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)


def _check_run_dir(cfg: TrainRecConfig, run_dir: Path) -> None:
    from megarec.engine.checkpoint import latest_tag

    if latest_tag(run_dir / "checkpoints") and not cfg.train.resume:
        raise ConfigError(f"train.run_dir {run_dir} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    saved = run_dir / "config.yaml"
    if cfg.train.resume and saved.is_file():
        before = to_dict(load_config(TrainRecConfig, saved))
        now = to_dict(cfg)
        for section in ("method", "data", "tiger", "sasrec"):
            if before[section] != now[section]:
                raise ConfigError(f"--resume: section {section!r} differs from {saved}; exact resume needs the "
                                  "same data and model")


def run(cfg: TrainRecConfig) -> dict[str, Any]:
    """Train, select on validation, test; returns the content of ``metrics.json`` (every rank)."""
    from megarec.distributed import barrier, get_logger, get_rank, get_world_size, is_main_process
    from megarec.engine.checkpoint import read_weights, load_state_dict_into
    from megarec.engine.deepspeed_setup import (WarmupCosine, build_engine, device, init_distributed,
                                                resolve_ds_config)
    from megarec.engine.sampler import batches_per_epoch
    from megarec.engine.trainer import LoopConfig, Trainer

    init_distributed()
    _set_cpu_threads(cfg.train.cpu_threads)
    log = get_logger("megarec.train_rec")
    run_dir = Path(cfg.train.run_dir)
    _check_run_dir(cfg, run_dir)
    method = _method(cfg.method)
    _seed_everything(cfg.train.seed)
    domains = read_domains(cfg.data)
    data = method.prepare(cfg, domains)
    model = method.build_model(cfg, data)          # same seed on every rank: identical initial weights
    if cfg.train.init_from:
        state, _ = read_weights(cfg.train.init_from)
        load_state_dict_into(model, state, source=cfg.train.init_from)
        log.info("initialised from %s", cfg.train.init_from)
    _seed_everything(cfg.train.seed + 1000 * get_rank())   # per-rank dropout stream
    world = get_world_size()
    total = cfg.train.epochs * batches_per_epoch(len(data.train), cfg.train.batch_size, world)
    ds = resolve_ds_config(cfg.train.deepspeed or None, micro_batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                           weight_decay=cfg.train.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s on %s: %d training samples, %d parameters, %d ranks, ZeRO stage %s, bf16 %s, %d steps",
             cfg.method, "+".join(d.name for d in domains), len(data.train), n_params, world,
             ds.get("zero_optimization", {}).get("stage", 0), ds.get("bf16", {}).get("enabled", False), total)
    engine = build_engine(model, ds, WarmupCosine(cfg.train.warmup_steps, total, cfg.train.min_lr_ratio))
    if is_main_process():
        _write_model_files(cfg, run_dir)
    barrier()
    metadata = {"format": FORMAT, "method": cfg.method, "config": json.dumps(to_dict(cfg))}
    task = method.make_task(cfg, data, device(), metadata)
    loop = LoopConfig(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      eval_every=cfg.train.eval_every, patience=cfg.train.patience, metric=cfg.train.metric,
                      log_every=cfg.train.log_every, save_every_steps=cfg.train.save_every_steps,
                      keep_checkpoints=cfg.train.keep_checkpoints, progress=cfg.train.progress)
    trainer = Trainer(engine, task, loop, run_dir)
    if cfg.train.resume:
        trainer.resume()
    return trainer.fit()


def _write_model_files(cfg: TrainRecConfig, run_dir: Path) -> None:
    """``config.yaml`` of the run and, for ``megarec recommend``, of the model folder (+ its codes file)."""
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_config(cfg, model_dir / "config.yaml")
    if cfg.method == "tiger":
        shutil.copyfile(cfg.data.codes, model_dir / "codes.safetensors")


# --------------------------------------------------------------------------- whole pipeline
# RQ-VAE settings per profile for TIGER's tokenizer (`megarec train-tokenizer` keys). TIGER: 3 levels
# of 256 codes plus the dedup token; cpu-small trains fewer epochs, tiny also shrinks the model.
TOKENIZER_PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"collisions": "dedup"},
    "cpu-small": {"collisions": "dedup", "epochs": 300, "eval_every": 100},
    "quickstart": {"collisions": "dedup", "epochs": 200, "eval_every": 100, "rqvae.codebook_sizes": "32,32,32"},
    "tiny": {"collisions": "dedup", "epochs": 5, "eval_every": 5, "rqvae.hidden": "64", "rqvae.code_dim": 8,
             "rqvae.codebook_sizes": "4,4", "kmeans_samples": 256, "rqvae.dead_code_steps": 0},
}


def tiger_codes(domains: list, out_dir: Path, profile: str, overrides: Sequence[tuple[str, str]] = (),
                 progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """TIGER's item tokenization: an RQ-VAE on the first domain's item text (``megarec
    train-tokenizer``), the same tokenizer for the other domains, one merged codes file.
    Reuses ``out_dir/codes.safetensors`` when it exists."""
    from megarec.config import TokenizerConfig
    from megarec.data.code_sequences import merge_codes
    from megarec.data.codes import CodesFile
    from megarec.tokenizer.commands import tokenize, train_tokenizer

    out = out_dir / "codes.safetensors"
    if out.is_file():
        return out, CodesFile.load(out).stats
    tok_dir = out_dir / "tokenizer"
    tok_cfg = load_config(TokenizerConfig, None,
                          [(k, str(v)) for k, v in TOKENIZER_PROFILES[profile].items()] + list(overrides))
    stats = train_tokenizer(domains[0], tok_cfg, tok_dir, progress=progress)
    files = [CodesFile.load(tok_dir / "codes.safetensors")]
    files += [tokenize(tok_dir, d, tok_dir / f"codes_{d.name}.safetensors") for d in domains[1:]]
    merge_codes(files).save(out)
    return out, stats


def run_pipeline(method: str, paths: Sequence[str | Path], out_dir: str | Path, profile: str = "cpu-small",
                 overrides: Sequence[tuple[str, str]] = (), tokenizer_overrides: Sequence[tuple[str, str]] = (),
                 progress: bool = True) -> dict[str, Any]:
    """One method end to end on one or more domains, in this process.

    ``tiger``: item text -> RQ-VAE codes (:func:`tiger_codes`) -> T5 -> beam search -> metrics;
    ``sasrec``: item ids -> SASRec -> full ranking -> metrics. Outputs under ``out_dir``
    (``codes.safetensors``, ``tokenizer/``, ``rec/``); returns ``metrics.json`` plus, for
    TIGER, the tokenizer's statistics under ``"tokenizer"``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    out = Path(out_dir)
    paths = [str(Path(p).resolve()) for p in paths]
    base = [("method", method)] + profile_overrides(method, profile) + [("data.paths", ",".join(paths)),
                                                  ("train.run_dir", str(out / "rec")),
                                                  ("train.progress", str(progress))]
    cfg = load_config(TrainRecConfig, None, base + list(overrides))   # validated before any compute
    tok_stats = None
    if method == "tiger":
        codes, tok_stats = tiger_codes(read_domains(cfg.data), out, profile, tokenizer_overrides, progress)
        cfg.data.codes = str(codes.resolve())
    result = dict(run(cfg))
    if tok_stats is not None:
        result["tokenizer"] = tok_stats
    return result


# --------------------------------------------------------------------------- inference
@dataclasses.dataclass
class TrainedModel:
    """A trained model with its domains, for ``megarec recommend``."""

    cfg: TrainRecConfig
    domains: list
    recommender: Any   # .recommend(histories [global item indices], k) -> (items [B, k], scores)

    def item_keys(self) -> list[str]:
        return [f"{d.name}/{i}" for d in self.domains for i in d.item_ids]


def load_trained(model_dir: str | Path, domain: str | None = None) -> TrainedModel:
    """Read a run or model folder; candidates are the items of ``domain`` (default: every domain)."""
    from megarec.data.codes import CodesFile
    from megarec.data.domain import DataError, MultiDomain
    from megarec.engine.checkpoint import MODEL_FILE, read_weights

    d = Path(model_dir)
    if (d / "model" / MODEL_FILE).is_file():
        d = d / "model"
    if not (d / MODEL_FILE).is_file() or not (d / "config.yaml").is_file():
        raise DataError(f"{model_dir}: not a trained model (expected {MODEL_FILE} and config.yaml, "
                        "e.g. the run folder of `megarec train-rec`)")
    cfg = load_config(TrainRecConfig, d / "config.yaml")
    state, meta = read_weights(d / MODEL_FILE)
    if meta.get("format") != FORMAT:
        raise DataError(f"{d / MODEL_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    domains = read_domains(cfg.data)
    multi = MultiDomain(domains)
    if domain is None:
        candidates = np.arange(multi.num_items)
    else:
        i = multi.domain_index(domain) if domain in [x.name for x in domains] else None
        if i is None:
            raise DataError(f"--domain {domain!r}: the model was trained on {[x.name for x in domains]}")
        candidates = np.arange(multi.offsets[i], multi.offsets[i] + domains[i].num_items)
    method = _method(cfg.method)
    if cfg.method == "tiger":
        rec = method.load_recommender(cfg, state, CodesFile.load(d / "codes.safetensors"), multi.item_keys(),
                                      candidates)
    else:
        rec = method.load_recommender(cfg, state, multi.num_items, candidates)
    return TrainedModel(cfg, domains, rec)


# --------------------------------------------------------------------------- command line
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_rec.py", description=__doc__.split("\n\n")[0],
                                epilog="Any config key can be overridden: --train.lr 3e-3 --data.paths a,b")
    p.add_argument("--config", default=None, help="YAML config (TrainRecConfig); keys not given keep defaults")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (sets train.deepspeed)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.run_dir")
    p.add_argument("--init_from", default=None, help="weights to fine-tune from (sets train.init_from)")
    p.add_argument("--profile", default=None, help=f"preset overrides: {', '.join(PROFILES)}")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainRecConfig:
    from megarec.config import parse_overrides

    args, rest = build_arg_parser().parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.profile:
        method = dict(overrides).get("method")
        if method is None:
            method = load_config(TrainRecConfig, args.config).method
        overrides = profile_overrides(method, args.profile) + overrides
    if args.deepspeed:
        overrides.append(("train.deepspeed", args.deepspeed))
    if args.resume:
        overrides.append(("train.resume", "true"))
    if args.init_from:
        overrides.append(("train.init_from", args.init_from))
    return load_config(TrainRecConfig, args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    from megarec.data.domain import DataError

    try:
        cfg = parse_args(argv)
        result = run(cfg)
    except (ConfigError, DataError) as e:
        print(f"train_rec: error: {e}", file=sys.stderr)
        return 2
    from megarec.distributed import is_main_process

    if is_main_process():
        print(json.dumps({"test": result["test"], "best_epoch": result["best_epoch"],
                          "train_s": round(result["train_s"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
