"""The data part of ``tools/bench_scale.py``: does UTGRec's training data path keep a 2B tokenizer step fed?

Fixtures at the paper run's sizes (``megarec/configs/utgrec_tokenizer_paper.yaml``): item shards of real
sample texts with Amazon "large"-size 500 px placeholder JPEGs, the Qwen2-VL-2B folder of
:func:`scale_tokenizer.prepare` (image processor at 224 px, a tokenizer padded to Qwen's 151,646 tokens),
cached VAE latents of 256 px images (a tiny ``AutoencoderKL``: the cache is written once before training, so
its encoder's size does not matter to the rate), encoder prompts of up to 256 text tokens and 128 text
targets. :func:`megarec.methods.utgrec.data_rate.items_per_second` runs the training loader exactly as
training does (shard reads, positives, JPEG decoding and resizing, the image processor, tokenisation, latent
rows) at 1 and 2 DataLoader workers, and with the latents not cached (VAE-size images decoded in the
workers), batch 16 anchors + 16 positives.

Beside it, what one GPU would consume: model FLOPs per item of the 2B tokenizer step counted the way
``perf/mfu`` counts them (:mod:`megarec.engine.flops`): a frozen weight costs its forward and the activation
gradient (4 FLOPs per parameter and token) where something below it trains (the LLM, under LoRA), its
forward alone where nothing does (the vision tower), a trainable weight 6 (the text decoder's output
layer over its target tokens); parameters counted on the meta device from the config. At an assumed MFU
(default 0.35, what well-tuned LoRA fine-tuning of a 2B model reaches on H100-class GPUs) the GPU's
dense bf16 peak gives items per second per GPU, and so the workers a rank needs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import scale_tokenizer

PAPER_CONFIG = scale_tokenizer.REPO / "megarec" / "configs" / "utgrec_tokenizer_paper.yaml"


def param_counts(qwen: Path) -> dict[str, int]:
    """Parameters of the Qwen2-VL at ``qwen`` (config only, built on the meta device): vision tower,
    language model without its embedding table (embeddings cost no FLOPs) and the embedding table."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(qwen))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel() if not model.config.get_text_config().tie_word_embeddings else 0
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "llm": total - vision - embed - head, "embed": embed}


def flops_per_item(counts: dict[str, int], hidden: int, vocab: int, llm_tokens: float, vision_patches: float,
                   text_targets: float) -> dict[str, float]:
    """Model FLOPs of one item (an anchor or a positive) in a tokenizer step, as ``perf/mfu`` counts them;
    attention scores and the small decoders and codebooks are left out (a few percent at these lengths)."""
    parts = {"llm": 4.0 * counts["llm"] * llm_tokens,               # frozen, LoRA inside: forward + activation grad
             "vision": 2.0 * counts["vision"] * vision_patches,     # frozen, nothing below trains: forward
             "text_head": 6.0 * hidden * vocab * text_targets}      # trainable output layer of Eq. 8's decoder
    parts["total"] = sum(parts.values())
    return parts


def run(work: Path, size: str = "paper", items: int = 256, workers: tuple[int, ...] = (1, 2), seconds: float = 20.0,
        mfu: float = 0.35, peak: float | None = None, batch: int = 16) -> dict[str, Any]:
    """Fixtures in ``work``, then the loader's rate per worker count (cached latents) and at one worker without
    the cache; the GPU's consumption at ``mfu`` of ``peak`` FLOP/s (default: the H200's dense bf16 peak)."""
    from megarec.config import load_config
    from megarec.engine.flops import PEAK_BF16
    from megarec.methods.utgrec.data_rate import items_per_second
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.latent_cache import write_latent_cache
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    s = dict(scale_tokenizer.sizes(size), items=items)
    work.mkdir(parents=True, exist_ok=True)
    qwen, vae, shards = scale_tokenizer.prepare(work, s)
    o = {"utgrec.encoder.path": qwen, "utgrec.decoder.vae_path": vae, "data.shards": shards,
         "train.batch_size": batch, "data.heldout_items": 0, "train.run_dir": work / "run"}
    overrides = [x for k, v in o.items() for x in (f"--{k}", str(v))]
    cfg = load_config(TrainTokenizerConfig, PAPER_CONFIG, overrides)
    d, e = cfg.utgrec.decoder, cfg.utgrec.encoder
    peak = peak or dict(PEAK_BF16)["H200"]
    rates: dict[str, dict] = {}
    nocache = items_per_second(cfg, 1, seconds)      # before the cache exists: VAE-size images in the worker
    cache = write_latent_cache(shards, str(vae), image_size=d.vae_image_size, patch=d.latent_patch, progress=False)
    for w in workers:
        rates[f"workers{w}"] = items_per_second(cfg, w, seconds)
    rates["workers1_no_latent_cache"] = nocache
    first = rates[f"workers{workers[0]}"]
    stats = {k: round(first[f"{k}_per_item"], 1) for k in ("encoder_tokens", "encoder_padded_tokens",
                                                            "vision_patches", "text_targets")}
    counts = param_counts(qwen)
    # the step computes on padded prompts (one batch, padded to its longest) and real text targets
    f = flops_per_item(counts, s["text"]["hidden_size"], s["tokenizer"], stats["encoder_padded_tokens"],
                       stats["vision_patches"], stats["text_targets"])
    gpu_items = mfu * peak / f["total"]
    per_worker = first["items_per_s_per_worker"]   # the first worker count (1): no other worker shares its core
    return {"size": size, "items": len(ItemLookup(shards)), "batch_anchors": batch, "image_side": e.image_size,
            "vae_image_size": d.vae_image_size, "encoder_text_tokens": e.max_text_tokens,
            "latent_cache": cache.name, "rates": rates, "per_item": stats, "params": counts,
            "flops_per_item": f, "assumed_mfu": mfu, "peak_flops": peak, "gpu_items_per_s": round(gpu_items, 1),
            "items_per_s_per_worker": round(per_worker, 1),
            "workers_per_gpu_needed": math.ceil(gpu_items / per_worker),
            "paper_config_workers": cfg.data.num_workers}


def table(res: dict[str, Any]) -> str:
    rows = ["| loader | workers | items/s | items/s per worker |", "|---|---|---|---|"]
    for name, r in res["rates"].items():
        rows.append(f"| {'latents not cached' if 'no_latent' in name else 'cached latents'} | {r['num_workers']} | "
                    f"{r['items_per_s']:.1f} | {r['items_per_s_per_worker']:.1f} |")
    f = res["flops_per_item"]
    rows.append(f"| one GPU consumes (MFU {res['assumed_mfu']:.2f}, {res['peak_flops'] / 1e12:.0f} TFLOP/s, "
                f"{f['total'] / 1e12:.2f} TFLOP per item) | - | {res['gpu_items_per_s']:.1f} | "
                f"{res['workers_per_gpu_needed']} workers |")
    return "\n".join(rows)
