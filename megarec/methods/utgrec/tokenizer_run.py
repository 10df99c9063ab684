"""UTGRec's tokenizer training: pre-training and fine-tuning from item shards, then the code export.

Reads the WebDataset item shards of ``data.shards`` (several domains in one shard folder =
multi-domain pre-training), pairs every item with a co-occurring item drawn from its
training-split positives, and trains the tokenizer of :mod:`megarec.methods.utgrec.tokenizer`
with ``L_T`` (Eq. 13) under DeepSpeed (AdamW, warmup + cosine). ``--init_from`` a pre-trained
tokenizer with ``train.finetune true`` is Sec. 2.4.2's tokenizer fine-tuning (E frozen; W, LoRA,
adapter and decoders trained; L fixed by the checkpoint). Afterwards the codes of every item of
``export.domains`` (default: all in the shards) are assigned over the merged catalogue with the
collision policy ``export.collisions`` (``utgrec``: unique IDs across domains) and written as a
codes file. Run folder ``train.run_dir``: ``config.yaml``, ``checkpoints/`` (``--resume``),
``model/`` (the trainable part only, :mod:`~megarec.methods.utgrec.tokenizer_files`: peft's
``adapter_model.safetensors`` + ``adapter_config.json``, the tokenizer's ``model.safetensors``, ``config.yaml``),
``codes.safetensors``, ``tb/``, ``metrics.json``. Under a ZeRO-3 config the content encoder is built partitioned
(no rank holds the whole frozen base); ``--init_from`` rebuilds the base from ``utgrec.encoder.path`` and reads
only the trainable files. ``train.dist_timeout_s`` is the collective timeout (start-up and export).
The steps run on :class:`~megarec.engine.loop.TrainLoop` (:class:`~.tokenizer_task.TokenizerTask`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megarec.config import ConfigError, load_config, save_config, to_dict
from megarec.methods.utgrec.batches import Batcher, export_codes
from megarec.methods.utgrec.latent_cache import LatentCache
from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig
PRIOR_ITEMS = 50_000   # items whose text tokens give the text decoder's initial unigram prior (a uniform sample)


# --------------------------------------------------------------------------- run
def _check(cfg: TrainTokenizerConfig, run_dir: Path) -> None:
    from megarec.engine.checkpoint import latest_tag
    from megarec.engine.deepspeed_setup import check_run_files

    from megarec.methods.utgrec.content_encoder import check_encoder_path

    if not cfg.data.shards:
        raise ConfigError("data.shards: give the item shard folder (`megarec build-shards`)")
    check_run_files(cfg.train.deepspeed, cfg.train.init_from)   # before the encoder is built
    if cfg.train.finetune and not cfg.train.init_from:
        raise ConfigError("train.finetune needs train.init_from (the pre-trained tokenizer)")
    check_encoder_path(cfg.utgrec.encoder.backend, cfg.utgrec.encoder.path)   # before the encoder is built
    if latest_tag(run_dir / "checkpoints") and not cfg.train.resume:
        raise ConfigError(f"train.run_dir {run_dir} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    saved = run_dir / "config.yaml"
    if cfg.train.resume and saved.is_file():
        before, now = to_dict(load_config(TrainTokenizerConfig, saved)), to_dict(cfg)
        for section in ("method", "data", "utgrec"):
            if before[section] != now[section]:
                raise ConfigError(f"--resume: section {section!r} differs from {saved}; exact resume needs the "
                                  "same data and model")


def run(cfg: TrainTokenizerConfig) -> dict[str, Any]:
    """Train (if any steps), export weights and codes; returns the content of ``metrics.json`` (every rank)."""
    from megarec.distributed import barrier, get_logger, get_rank, get_world_size, is_main_process
    from megarec.engine.checkpoint import write_json
    from megarec.engine.deepspeed_setup import (WarmupCosine, accelerator_name, build_engine, device,
                                                init_distributed, resolve_ds_config, seed_everything,
                                                set_cpu_threads)
    from megarec.engine.loop import LoopSettings, TrainLoop
    from megarec.engine.memory_model import gather_host_peaks, host_peak_gb, host_resident_gb, release_free_heap
    from megarec.methods.utgrec.data_path import TrainBatchMaker, check_data, resolve_latents, train_loader
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.content_encoder import full_numel, is_zero3
    from megarec.methods.utgrec.tokenizer import build_model, freeze_for_finetuning
    from megarec.methods.utgrec.tokenizer_files import export_tokenizer, load_tokenizer
    from megarec.methods.utgrec.tokenizer_task import TokenizerTask

    init_distributed(cfg.train.dist_timeout_s)
    set_cpu_threads(cfg.train.cpu_threads)
    log = get_logger("megarec.train_tokenizer")
    run_dir = Path(cfg.train.run_dir)
    _check(cfg, run_dir)
    rank, world = get_rank(), get_world_size()
    dev = device()
    lookup = ItemLookup(cfg.data.shards, cfg.data.text_fields)
    check_data(cfg, lookup)   # images / latents file as the config asks, before anything is built
    ds_cfg = resolve_ds_config(cfg.train.deepspeed or None, micro_batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                               weight_decay=cfg.train.weight_decay)
    zero3 = is_zero3(ds_cfg)
    seed_everything(cfg.train.seed)
    model, latents = build_model(cfg.utgrec, gpu=accelerator_name() != "cpu",   # same seed: same weights everywhere
                                 ds_config=ds_cfg)                             # ZeRO-3: partitioned from load on
    release_free_heap()   # the build's freed full-size tensors (2B, 2 ranks: 6.3 -> 3.3 GB resident a rank)
    if latents is not None and not isinstance(latents, LatentCache):
        latents.to(dev)
    if not cfg.train.init_from:   # text decoder starts at the catalogue's token marginal (same on every rank)
        prior_items = np.random.default_rng(cfg.train.seed).permutation(len(lookup))[:PRIOR_ITEMS]
        model.init_text_prior([lookup.text(int(i)) for i in np.sort(prior_items)])
    if cfg.train.init_from:   # the trainable part only; the base is the one built from utgrec.encoder.path
        load_tokenizer(model, cfg.train.init_from)
        log.info("initialised from %s (base from %s)", cfg.train.init_from, cfg.utgrec.encoder.path or "default")
    if cfg.train.finetune:
        freeze_for_finetuning(model)
    seed_everything(cfg.train.seed + 1000 * rank)   # per-rank dropout / diffusion-noise streams
    latents = resolve_latents(cfg, latents, lookup, dev)   # the catalogue's VAE latents, once (every rank a slice)
    maker = TrainBatchMaker.for_config(cfg, model.encoder.preparer(), lookup, latents, rank)
    ds, loader = train_loader(cfg, maker)   # anchors + positives prepared in data.num_workers workers
    accumulation = int(ds_cfg["gradient_accumulation_steps"])
    total = cfg.train.max_steps or cfg.train.epochs * len(ds) // accumulation   # optimizer steps
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    log.info("utgrec tokenizer: %d items, %d ranks, ZeRO stage %s, bf16 %s, %d steps, %d trainable of %d parameters",
             len(lookup), world, ds_cfg.get("zero_optimization", {}).get("stage", 0),
             ds_cfg.get("bf16", {}).get("enabled", False), total, trainable,
             sum(full_numel(p) for p in model.parameters()))
    engine = build_engine(model, ds_cfg, WarmupCosine(cfg.train.warmup_steps, max(total, 1), cfg.train.min_lr_ratio))
    module = engine.module
    load_peak_gb = host_peak_gb()   # the model built and partitioned, nothing trained yet
    log.info("host memory after build: %.2f GB resident, %.2f GB peak (rank %d)", host_resident_gb(),
             load_peak_gb, rank)
    if zero3:   # peft's code-token layer reads partitioned tensors outside their modules (export, k-means)
        module.encoder.register_zero3_params()
    if is_main_process():
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_config(cfg, run_dir / "model" / "config.yaml")
    barrier()
    batcher = Batcher(cfg, module, latents, lookup, dev)
    task = TokenizerTask(cfg, module, batcher, loader, len(lookup), total, accumulation, rank, dev)
    settings = LoopSettings(log_every=cfg.train.log_every, save_every_steps=cfg.train.save_every_steps,
                            eval_every_steps=cfg.train.eval_every, keep_checkpoints=cfg.train.keep_checkpoints,
                            progress=cfg.train.progress, peak_tflops=cfg.train.peak_tflops)
    loop = TrainLoop(engine, task, settings, run_dir, log_name=log.name)
    if cfg.train.resume:
        loop.resume()
    state = loop.fit()

    export_tokenizer(module, run_dir / "model", {"config": json.dumps(to_dict(cfg))})
    result: dict[str, Any] = {"method": cfg.method, "global_step": state["global_step"], "train_s": state["train_s"],
                              "resumed_from_step": state["resumed_from_step"], "last": task.last,
                              "bad_samples": loader.bad_samples + batcher.bad_images,
                              "heldout_collision_rate": task.heldout_collisions()}
    if cfg.export.codes:
        codes = export_codes(module, batcher, lookup, cfg.export.domains, cfg.export.collisions,
                             cfg.export.batch_size, run_dir / "codes.safetensors")
        result["codes"] = None if codes is None else {k: v for k, v in codes.stats.items() if k != "levels_before"}
    device_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    peaks = gather_host_peaks([load_peak_gb, host_peak_gb(), device_gb])
    result["memory"] = {"load_peak_gb": [round(p[0], 3) for p in peaks], "host_peak_gb": [round(p[1], 3) for p in peaks],
                        "device_peak_gb": [round(p[2], 3) for p in peaks],
                        "parameters": {"trainable": trainable, "total": sum(full_numel(p) for p in model.parameters())}}
    write_json(run_dir / "metrics.json", result)
    barrier()
    if zero3:   # transformers' ZeRO-3 switch off again for whatever this process builds next
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return result
