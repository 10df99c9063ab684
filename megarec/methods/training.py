"""One recommender training run, the whole pipeline of a method, and loading a trained model.

``TrainRecConfig`` is assembled from the method registry (one section per plug-in);
:func:`run` trains, selects on validation and tests one method (the plug-in supplies data,
model, task; :class:`~megarec.engine.trainer.Trainer` runs it on :class:`~megarec.engine.loop.TrainLoop`);
:func:`run_pipeline` runs the method's pipeline stages first (tokenizer, teacher); :func:`load_trained` reads a
run or model folder back for ``megarec recommend``. ``train_rec.py`` is the command line
around :func:`run`; pipeline stages of a method (e.g. a SASRec teacher) call :func:`run` too.
Plug-ins are named by string in the registry, so this module imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megarec.config import ConfigError, DataConfig, field, load_config, save_config, to_dict
from megarec.methods import DEFAULT_METHOD, REGISTRY, get_method
from megarec.methods.profiles import flatten, load_profile

FORMAT = "megarec-rec/1"


@dataclasses.dataclass
class RecDataConfig(DataConfig):
    codes: str = field("", help="codes file with an ID for every item of data.paths (generative methods; "
                                "`megarec train-tokenizer`)")


@dataclasses.dataclass
class RecTrainConfig:
    lr: float = field(1e-3, min=0.0, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.05, min=0.0, help="AdamW weight decay (never on norms, biases and "
                                                    "relative-position tables)")
    warmup_steps: int = field(100, min=0, help="linear warmup steps, then cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = field(0.0, min=0.0, max=1.0, help="learning rate at the end of the cosine")
    grad_clip: float = field(-1.0, min=-1.0, help="gradient-norm clipping (-1 = the DeepSpeed config's; 0 = off)")
    epochs: int = field(200, min=0, help="maximum epochs (early stopping usually ends sooner)")
    batch_size: int = field(256, min=1, help="training samples per rank and step")
    group_by_length: bool = field(True, help="batch training samples of similar length together (methods that "
                                             "give sample lengths: the generative ones); less padding")
    group_window: int = field(50, min=1, help="batches per length-sorted window (group_by_length)")
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
    cpu_bf16: bool = field(False, help="bf16 autocast of the training forward on CPU ranks (AVX512-BF16/AMX): "
                                       "1.9x faster for a d_model-128 T5, slower at cpu-small's d_model 64 "
                                       "(tools/bench_cpu_bf16.py); GPUs use the DeepSpeed config's bf16")
    cpu_threads: int = field(0, min=0, help="torch threads per rank on CPU (0 = this process's cores / ranks on "
                                            "the node, unless OMP_NUM_THREADS is set)")
    peak_tflops: float = field(0.0, min=0.0, help="peak TFLOP/s of one device for perf/mfu (0 = a known GPU's "
                                                  "bf16 dense peak by name; on CPU perf/mfu needs this)")


def _build_config_class() -> type:
    """``TrainRecConfig``: method, data, one section per registered method (declared by the
    plug-in), train. Adding a method adds its section here without editing this file."""
    sections: list[tuple[str, type, Any]] = []
    seen: set[str] = set()
    for name in REGISTRY:
        m = get_method(name)
        if m.config_section and m.config_section not in seen:
            seen.add(m.config_section)
            sections.append((m.config_section, m.config_cls, field(default_factory=m.config_cls)))
    cls = dataclasses.make_dataclass("TrainRecConfig", [
        ("method", str, field(DEFAULT_METHOD, choices=tuple(REGISTRY), help="recommender method")),
        ("data", RecDataConfig, field(default_factory=RecDataConfig)),
        *sections,
        ("train", RecTrainConfig, field(default_factory=RecTrainConfig)),
    ])
    cls.__module__ = __name__
    return cls


TrainRecConfig = _build_config_class()


def profile_layer(method: str, profile: str) -> tuple[str, dict[str, Any]]:
    """The profile's keys as a config layer ``(source, mapping)`` for :func:`load_config`."""
    p = load_profile(method, profile)
    return str(p.path), p.rec


# --------------------------------------------------------------------------- training
def read_domains(cfg: DataConfig) -> list:
    """Read ``cfg.paths`` (every input error is raised here, before any compute)."""
    from megarec.data.readers import read_domain

    if not cfg.paths:
        raise ConfigError("data.paths: give at least one domain folder or file")
    domains = [read_domain(p, kcore=cfg.kcore, text_fields=cfg.text_fields) for p in cfg.paths]
    return [d.sample_users(cfg.max_users) for d in domains] if cfg.max_users else domains


def check_inputs(cfg: Any) -> None:
    """The files a run reads besides its data (:func:`read_domains`), checked before any work."""
    from megarec.engine.deepspeed_setup import check_run_files

    check_run_files(cfg.train.deepspeed, cfg.train.init_from)


def _check_run_dir(cfg: Any, run_dir: Path) -> None:
    from megarec.engine.checkpoint import latest_tag

    if latest_tag(run_dir / "checkpoints") and not cfg.train.resume:
        raise ConfigError(f"train.run_dir {run_dir} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    saved = run_dir / "config.yaml"
    if cfg.train.resume and saved.is_file():
        before = to_dict(load_config(TrainRecConfig, saved))
        now = to_dict(cfg)
        for section in now:
            if section != "train" and before[section] != now[section]:
                raise ConfigError(f"--resume: section {section!r} differs from {saved}; exact resume needs the "
                                  "same data and model")


def run(cfg: Any) -> dict[str, Any]:
    """Train, select on validation, test; returns the content of ``metrics.json`` (every rank)."""
    from megarec.distributed import barrier, get_logger, get_rank, get_world_size, is_main_process
    from megarec.engine.checkpoint import read_weights, load_state_dict_into
    from megarec.engine.deepspeed_setup import (WarmupCosine, build_engine, device, init_distributed,
                                                resolve_ds_config, seed_everything, set_cpu_threads)
    from megarec.engine.sampler import batches_per_epoch
    from megarec.engine.trainer import LoopConfig, Trainer

    check_inputs(cfg)
    init_distributed()
    set_cpu_threads(cfg.train.cpu_threads)
    log = get_logger("megarec.train_rec")
    run_dir = Path(cfg.train.run_dir)
    _check_run_dir(cfg, run_dir)
    method = get_method(cfg.method)
    seed_everything(cfg.train.seed)
    domains = read_domains(cfg.data)
    data = method.prepare(cfg, domains)
    model = method.build_model(cfg, data)          # same seed on every rank: identical initial weights
    if cfg.train.init_from:
        state, _ = read_weights(cfg.train.init_from)
        load_state_dict_into(model, state, source=cfg.train.init_from)
        log.info("initialised from %s", cfg.train.init_from)
    metadata = {"format": FORMAT, "method": cfg.method, "config": json.dumps(to_dict(cfg))}
    task = method.make_task(cfg, data, device(), metadata)
    seed_everything(cfg.train.seed + 1000 * get_rank())   # per-rank dropout stream
    world = get_world_size()
    ds = resolve_ds_config(cfg.train.deepspeed or None, micro_batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                           weight_decay=cfg.train.weight_decay,
                           grad_clip=None if cfg.train.grad_clip < 0 else cfg.train.grad_clip)
    # optimizer steps: an epoch ends on an accumulation boundary (engine.sources.EpochBatches)
    per_epoch = batches_per_epoch(task.num_samples, cfg.train.batch_size, world)
    total = cfg.train.epochs * (per_epoch // int(ds["gradient_accumulation_steps"]))
    groups = method.param_groups(cfg, model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s on %s: %d training samples, %d parameters in %d optimiser groups, %d ranks, ZeRO stage %s, "
             "bf16 %s, %d steps", cfg.method, "+".join(d.name for d in domains), task.num_samples, n_params,
             len(groups), world, ds.get("zero_optimization", {}).get("stage", 0),
             ds.get("bf16", {}).get("enabled", False), total)
    steps = per_epoch // int(ds["gradient_accumulation_steps"])
    engine = build_engine(model, ds, WarmupCosine(cfg.train.warmup_steps, total, cfg.train.min_lr_ratio),
                          model_parameters=groups, gates=task.lr_gates,
                          part_steps={k: n * steps for k, n in task.lr_part_epochs.items()})
    if is_main_process():
        _write_model_files(cfg, run_dir)
    barrier()
    loop = LoopConfig(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      eval_every=cfg.train.eval_every, patience=cfg.train.patience, metric=cfg.train.metric,
                      log_every=cfg.train.log_every, save_every_steps=cfg.train.save_every_steps,
                      keep_checkpoints=cfg.train.keep_checkpoints, progress=cfg.train.progress,
                      group_by_length=cfg.train.group_by_length, group_window=cfg.train.group_window,
                      cpu_bf16=cfg.train.cpu_bf16, peak_tflops=cfg.train.peak_tflops)
    trainer = Trainer(engine, task, loop, run_dir)
    if cfg.train.resume:
        trainer.resume()
    return trainer.fit()


def _write_model_files(cfg: Any, run_dir: Path) -> None:
    """``config.yaml`` of the run and, for ``megarec recommend``, of the model folder (+ the
    files the method's model folder needs)."""
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_config(cfg, model_dir / "config.yaml")
    get_method(cfg.method).write_model_files(cfg, model_dir)


# --------------------------------------------------------------------------- whole pipeline
def pipeline_config(method: str, paths: Sequence[str | Path], out_dir: str | Path, profile: str = "cpu-small",
                    overrides: Sequence[tuple[str, str]] = (), progress: bool = True) -> Any:
    """The validated run config of :func:`run_pipeline` (profile < overrides)."""
    get_method(method)   # unknown method: ConfigError listing the registered ones
    out = Path(out_dir)
    base = [("method", method), ("data.paths", ",".join(str(Path(p).resolve()) for p in paths)),
            ("train.run_dir", str(out / "rec")), ("train.progress", str(progress))]
    return load_config(TrainRecConfig, None, base + list(overrides), base=[profile_layer(method, profile)])


def run_pipeline(method: str, paths: Sequence[str | Path], out_dir: str | Path, profile: str = "cpu-small",
                 overrides: Sequence[tuple[str, str]] = (),
                 stage_overrides: dict[str, Sequence[tuple[str, str]]] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """One method end to end on one or more domains, in this process.

    The method's pipeline stages run first (:meth:`~megarec.methods.base.Method.prepare_inputs`:
    e.g. TIGER's item text -> RQ-VAE -> codes file), with the profile's ``stages:`` settings
    plus ``stage_overrides`` (stage name -> ``--key value`` pairs); then the recommender
    trains, is selected on validation and tested. Outputs under ``out_dir`` (the stages'
    folders, ``rec/``); returns ``metrics.json`` plus each stage's statistics under its name.
    """
    cfg = pipeline_config(method, paths, out_dir, profile, overrides, progress)   # validated before any compute
    check_inputs(cfg)
    stages = {k: flatten(v) for k, v in load_profile(method, profile).stages.items()}
    for k, extra in (stage_overrides or {}).items():
        stages[k] = stages.get(k, []) + list(extra)
    extras = get_method(method).prepare_inputs(cfg, read_domains(cfg.data), Path(out_dir), stages, progress)
    result = dict(run(cfg))
    result.update(extras)
    return result


# --------------------------------------------------------------------------- inference
@dataclasses.dataclass
class TrainedModel:
    """A trained model with its domains, for ``megarec recommend``."""

    cfg: Any
    domains: list
    recommender: Any   # .recommend(histories [global item indices], k) -> (items [B, k], scores)

    def item_keys(self) -> list[str]:
        return [f"{d.name}/{i}" for d in self.domains for i in d.item_ids]


def load_trained(model_dir: str | Path, domain: str | None = None) -> TrainedModel:
    """Read a run or model folder; candidates are the items of ``domain`` (default: every domain)."""
    from megarec.data.domain import DataError, MultiDomain
    from megarec.engine.checkpoint import MODEL_FILE, read_weights

    d = Path(model_dir)
    if (d / "model" / MODEL_FILE).is_file():
        d = d / "model"
    if not (d / MODEL_FILE).is_file() or not (d / "config.yaml").is_file():
        raise DataError(f"{model_dir}: not a trained model (expected {MODEL_FILE} and config.yaml, "
                        "e.g. the run folder of `megarec train-rec`)")
    cfg = load_config(TrainRecConfig, d / "config.yaml")
    method = get_method(cfg.method)
    missing = [f for f in method.model_files if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d}: a {cfg.method} model folder also needs {', '.join(missing)}")
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
    return TrainedModel(cfg, domains, method.load_recommender(cfg, d, state, multi, candidates))
