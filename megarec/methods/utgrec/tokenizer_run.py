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
``model/`` (``model.safetensors`` + ``config.yaml``), ``codes.safetensors``, ``tb/``, ``metrics.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megarec.config import ConfigError, load_config, save_config, to_dict
from megarec.engine.trainer import HANG_ENV
from megarec.methods.utgrec.batches import Batcher, codebook_stats, encode_catalogue, export_codes
from megarec.methods.utgrec.latent_cache import LatentCache
from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

FORMAT = "megarec-utgrec-tokenizer/1"
PRIOR_ITEMS = 50_000   # items whose text tokens give the text decoder's initial unigram prior (a uniform sample)


# --------------------------------------------------------------------------- run
def _check(cfg: TrainTokenizerConfig, run_dir: Path) -> None:
    from megarec.engine.checkpoint import latest_tag
    from megarec.engine.deepspeed_setup import check_run_files

    if not cfg.data.shards:
        raise ConfigError("data.shards: give the item shard folder (`megarec build-shards`)")
    check_run_files(cfg.train.deepspeed, cfg.train.init_from)   # before the encoder is built
    if cfg.train.finetune and not cfg.train.init_from:
        raise ConfigError("train.finetune needs train.init_from (the pre-trained tokenizer)")
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
    from tqdm import tqdm

    from megarec.data.shards import ShardDataset, ShardLoader
    from megarec.distributed import all_reduce_sum, barrier, get_logger, get_rank, get_world_size, is_main_process
    from megarec.engine.checkpoint import (MODEL_FILE, export_safetensors, load_checkpoint, load_state_dict_into,
                                           read_weights, save_checkpoint, write_json)
    from megarec.engine import preemption
    from megarec.engine.deepspeed_setup import (WarmupCosine, accelerator_name, build_engine, current_lr, device,
                                                init_distributed, resolve_ds_config, seed_everything,
                                                set_cpu_threads)
    from megarec.engine.tb import TBLogger, memory_gb
    from megarec.methods.utgrec.tokenizer import build_model, freeze_for_finetuning, quantizing, tokenizer_loss
    from megarec.methods.utgrec.item_lookup import ItemLookup

    init_distributed()
    set_cpu_threads(cfg.train.cpu_threads)
    log = get_logger("megarec.train_tokenizer")
    run_dir = Path(cfg.train.run_dir)
    _check(cfg, run_dir)
    rank, world = get_rank(), get_world_size()
    dev = device()
    lookup = ItemLookup(cfg.data.shards, cfg.data.text_fields)
    seed_everything(cfg.train.seed)
    model, latents = build_model(cfg.utgrec, gpu=accelerator_name() != "cpu")   # same seed: same weights everywhere
    if latents is not None and not isinstance(latents, LatentCache):
        latents.to(dev)
    if not cfg.train.init_from:   # text decoder starts at the catalogue's token marginal (same on every rank)
        prior_items = np.random.default_rng(cfg.train.seed).permutation(len(lookup))[:PRIOR_ITEMS]
        model.init_text_prior([lookup.text(int(i)) for i in np.sort(prior_items)])
    if cfg.train.init_from:
        state, _ = read_weights(cfg.train.init_from)
        load_state_dict_into(model, state, source=cfg.train.init_from)
        log.info("initialised from %s", cfg.train.init_from)
    if cfg.train.finetune:
        freeze_for_finetuning(model)
    seed_everything(cfg.train.seed + 1000 * rank)   # per-rank dropout / diffusion-noise streams
    u = cfg.utgrec
    qwen = u.encoder.backend == "qwen2vl"
    ds = ShardDataset(cfg.data.shards, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      buffer_size=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers,
                      on_bad_sample=cfg.data.on_bad_sample,
                      load_images=qwen or (latents is not None and not isinstance(latents, LatentCache)),
                      image_size=u.encoder.image_size if qwen else u.decoder.vae_image_size)
    # Its own generator: a DataLoader iterator draws a base seed when created, which would otherwise come from
    # the global RNG and shift the dropout / noise stream of a resumed run (it creates its iterator mid-epoch).
    loader = ShardLoader(ds, generator=torch.Generator().manual_seed(cfg.train.seed))
    total = cfg.train.max_steps or cfg.train.epochs * len(ds)
    ds_cfg = resolve_ds_config(cfg.train.deepspeed or None, micro_batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                               weight_decay=cfg.train.weight_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("utgrec tokenizer: %d items, %d ranks, ZeRO stage %s, bf16 %s, %d steps, %d trainable of %d parameters",
             len(lookup), world, ds_cfg.get("zero_optimization", {}).get("stage", 0),
             ds_cfg.get("bf16", {}).get("enabled", False), total, trainable, sum(p.numel() for p in model.parameters()))
    engine = build_engine(model, ds_cfg, WarmupCosine(cfg.train.warmup_steps, max(total, 1), cfg.train.min_lr_ratio))
    module = engine.module
    if is_main_process():
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_config(cfg, run_dir / "model" / "config.yaml")
    barrier()
    ckpt_dir = run_dir / "checkpoints"
    st: dict[str, Any] = {"global_step": 0, "kmeans_done": bool(cfg.train.init_from), "train_s": 0.0,
                          "loader": loader.state_dict(), "restarts": 0, "last": {}}
    resumed_from = None
    if cfg.train.resume:
        loaded = load_checkpoint(engine, ckpt_dir)
        if loaded is not None:
            st = loaded
            loader.load_state_dict(st["loader"])
            resumed_from = st["global_step"]
            for name, v in st.get("tree_unused", {}).items():   # dead-code counters, restored explicitly
                getattr(module.tree, f"{name}_unused").copy_(torch.tensor(v))
            log.info("resumed at step %d", resumed_from)
    batcher = Batcher(cfg, module, latents, lookup, dev)
    warmup = 0 if cfg.train.init_from else u.loss.warmup_steps
    heldout = np.random.default_rng(cfg.train.seed).permutation(len(lookup))[:cfg.data.heldout_items]
    tb = TBLogger(run_dir / "tb", purge_step=st["global_step"] + 1 if resumed_from is not None else None)
    hang_at = int(os.environ.get(HANG_ENV, "0") or 0)
    sizes = module.codebook_sizes
    sums: dict[str, torch.Tensor] = {}
    counts = [torch.zeros(k, dtype=torch.long, device=dev) for k in sizes]
    steps = samples = 0
    tokens = torch.zeros((), dtype=torch.long, device=dev)
    if st.get("window"):
        w = st.pop("window")
        sums = {k: torch.tensor(v, device=dev) for k, v in w["sums"].items()}
        steps, samples = w["steps"], w["samples"]
        tokens.fill_(w["tokens"])
        counts = [torch.tensor(c, dtype=torch.long, device=dev) for c in w["counts"]]
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=st["global_step"], desc="utgrec tokenizer",
               disable=not (cfg.train.progress and is_main_process()))
    engine.train()

    def checkpoint() -> None:
        """Save; the open logging window travels with the checkpoint, so a resumed run logs the same curve."""
        st["window"] = {"sums": {k: float(v) for k, v in sums.items()}, "steps": steps, "samples": samples,
                        "tokens": int(tokens), "counts": [c.cpu().tolist() for c in counts]}
        st["tree_unused"] = _unused_state(module.tree)
        save_checkpoint(engine, ckpt_dir, dict(st), keep=cfg.train.keep_checkpoints)
        del st["window"]

    def heldout_collisions() -> float:
        from megarec.tokenizer.assign import collision_rate

        if len(heldout) == 0:
            return 0.0
        h = encode_catalogue(module, batcher, heldout, cfg.export.batch_size)
        snap = module.tree.snapshot()
        return collision_rate(snap.last_level(h)[0].numpy())

    while st["global_step"] < total:
        for batch in loader:
            step = st["global_step"]
            enc, ids, mask, lat, has = batcher.train_batch(batch, step, rank)
            quant = quantizing(step, warmup)
            if quant and u.codebook.kmeans_init and not st["kmeans_done"]:
                with torch.no_grad():   # anchors and positives of this step, pooled over ranks
                    module.tree.init_from_data(module.code_inputs(**enc))
                st["kmeans_done"] = True
            out = engine(enc, ids, mask, lat, has, quantize=quant)
            losses = tokenizer_loss(out, u.loss, quant)
            engine.backward(losses["loss"])
            engine.step()
            if quant:
                st["restarts"] += module.tree.restart_dead_codes()
            for k, v in losses.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float().clone()
            codes = out.tree.codes
            for l in range(len(sizes)):
                counts[l] += torch.bincount(codes[:, l], minlength=sizes[l])
            tokens += enc["attention_mask"].sum()
            steps += 1
            samples += ids.shape[0] // 2 * world   # training samples = anchors (each also encodes a positive)
            st["global_step"] = step + 1
            st["loader"] = loader.state_dict()
            bar.update(1)
            gs = st["global_step"]
            if gs % cfg.train.log_every == 0 or gs == total:
                for c in counts:
                    all_reduce_sum(c)
                all_reduce_sum(tokens)
                dt = time.perf_counter() - t0
                st["train_s"] += dt
                means = {k: float(v) / steps for k, v in sums.items()}
                stats = codebook_stats([c.cpu() for c in counts])
                tb.scalars(means, gs, prefix="loss/")
                tb.scalars({**stats, "restarts": st["restarts"]}, gs, prefix="codebook/")
                tb.scalars({"samples_per_s": samples / max(dt, 1e-9), "tokens_per_s": float(tokens) / max(dt, 1e-9),
                            "memory_gb": memory_gb()}, gs, prefix="perf/")
                tb.scalars({"lr": current_lr(engine), "quantizing": float(quant)}, gs, prefix="train/")
                tb.scalars({"bad_samples": loader.bad_samples + batcher.bad_images}, gs, prefix="data/")
                st["last"] = {**means, **stats}
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                sums, steps, samples = {}, 0, 0
                counts = [torch.zeros(k, dtype=torch.long, device=dev) for k in sizes]
                tokens.zero_()
                t0 = time.perf_counter()
            if gs % cfg.train.eval_every == 0:
                rate = heldout_collisions()
                tb.scalars({"collision_rate": rate}, gs, prefix="codebook/")
                st["last"]["collision_rate"] = rate
                log.info("step %d/%d %s held-out collision rate %.4f", gs, total, _summary(st["last"]), rate)
                t0 = time.perf_counter()
            if gs % cfg.train.save_every_steps == 0 and gs < total:
                checkpoint()
                t0 = time.perf_counter()
            if hang_at and gs == hang_at:
                _hang(tb, run_dir, gs)
            if preemption.should_stop(gs):   # collective; False unless a guard is installed (slurm/)
                checkpoint()
                log.warning("preemption signal: checkpoint at step %d saved in %s, exiting %d", gs, ckpt_dir,
                            preemption.EXIT_CODE)
                raise preemption.preempted(gs)
            if gs >= total:
                break
    bar.close()
    if total > 0:
        st["tree_unused"] = _unused_state(module.tree)
        save_checkpoint(engine, ckpt_dir, dict(st), keep=cfg.train.keep_checkpoints)
    export_safetensors(module, run_dir / "model" / MODEL_FILE,
                       {"format": FORMAT, "config": json.dumps(to_dict(cfg))})
    result: dict[str, Any] = {"method": cfg.method, "global_step": st["global_step"], "train_s": st["train_s"],
                              "resumed_from_step": resumed_from, "last": st["last"],
                              "bad_samples": loader.bad_samples + batcher.bad_images,
                              "heldout_collision_rate": heldout_collisions()}
    if cfg.export.codes:
        codes = export_codes(module, batcher, lookup, cfg.export.domains, cfg.export.collisions,
                             cfg.export.batch_size, run_dir / "codes.safetensors")
        result["codes"] = None if codes is None else {k: v for k, v in codes.stats.items() if k != "levels_before"}
    write_json(run_dir / "metrics.json", result)
    tb.close()
    barrier()
    return result


def _unused_state(tree) -> dict[str, list[int]]:
    """The dead-code counters of the tree codebooks (buffers), saved with the trainer state."""
    return {"root": tree.root_unused.cpu().tolist(), "leaf": tree.leaf_unused.cpu().tolist()}


def _hang(tb, run_dir: Path, step: int) -> None:
    """Test hook (``MEGAREC_TEST_HANG_AFTER_STEP``): flush logs, say so, wait to be killed."""
    from megarec.distributed import barrier, is_main_process

    tb.flush()
    barrier()
    if is_main_process():
        (run_dir / f"hanging_at_step{step}").touch()
    from megarec.engine import preemption

    while not preemption.received():   # killed by the test, or (under a guard) preempted by a signal
        time.sleep(0.2)


def _summary(last: dict[str, float]) -> str:
    """The last logging window's losses and per-level perplexities, for the console / SLURM log."""
    keys = ["loss", *sorted(k for k in last if k not in ("loss", "collision_rate") and not k.startswith("usage_"))]
    return " ".join(f"{k} {last[k]:.4g}" for k in keys if k in last)
