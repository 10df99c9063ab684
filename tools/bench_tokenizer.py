"""Training throughput of ``train_tokenizer.py`` (UTGRec tokenizer) vs a plain PyTorch loop.

    python tools/bench_tokenizer.py [--quick] --json bench_tokenizer.json [--steps N] [--threads 1]

Both loops train the same UTGRec tokenizer (``megarec/configs/utgrec_tokenizer_cpu.yaml``: the
bundled all-MiniLM-L6-v2 content encoder with LoRA and code tokens, tree codebooks, masked text
decoder; same seed, same weights) on the same batches (anchors + co-occurring positives of the
embedded sample's item shards, drawn by the same ``Batcher``) with the same math: ``L_T``
(Eq. 13), AdamW, warmup + cosine, k-means initialisation at the first quantised step and dead-code
restarts after every step, fp32, one CPU rank.

- ``plain``: the batches are built before timing; ``out = model(...); loss = tokenizer_loss(out);
  loss.backward(); opt.step(); sched.step(); opt.zero_grad(); restart_dead_codes()``;
- ``megarec``: :func:`megarec.methods.utgrec.tokenizer_run.run` (DeepSpeed engine, ZeRO stage 0 built-in config,
  shard reader, batch building from the shards inside the loop, codebook usage counts, TensorBoard
  per ``log_every``); its time is the run's own ``train_s`` (training steps only: not the held-out
  collision rate, the checkpoint or the code export that follow).

Rounds alternate plain / megarec (``--repeats``); each reports samples/s (anchors per second) and
the median round is kept. ``summary.tokenizer_overhead`` = megarec time per sample / plain time per
sample (target <= 1.1). On a machine shared with other jobs pass ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.formatting import format_table  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "megarec" / "configs" / "utgrec_tokenizer_cpu.yaml"


def make_config(shards: Path, run_dir: Path, steps: int, batch: int):
    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig

    return load_config(TrainTokenizerConfig, PRESET, [
        ("data.shards", str(shards)), ("data.heldout_items", "0"), ("data.shuffle_buffer", "64"),
        ("train.run_dir", str(run_dir)), ("train.max_steps", str(steps)), ("train.batch_size", str(batch)),
        ("train.warmup_steps", "2"), ("train.log_every", str(steps)), ("train.eval_every", str(10 * steps)),
        ("train.save_every_steps", str(10 * steps)), ("train.progress", "false"), ("utgrec.loss.warmup_steps", "0"),
        ("export.codes", "false")])


def plain_batches(cfg, steps: int) -> list:
    """The first ``steps`` batches of the shards, built as train_tokenizer.py builds them."""
    from megarec.data.shards import ShardDataset, ShardLoader
    from megarec.methods.utgrec.tokenizer import build_model
    from megarec.methods.utgrec.item_lookup import ItemLookup
    from megarec.methods.utgrec.batches import Batcher

    torch.manual_seed(cfg.train.seed)
    model, latents = build_model(cfg.utgrec)
    lookup = ItemLookup(cfg.data.shards, cfg.data.text_fields)
    ds = ShardDataset(cfg.data.shards, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      buffer_size=cfg.data.shuffle_buffer, load_images=False)
    batcher = Batcher(cfg, model, latents, lookup, torch.device("cpu"))
    out = []
    while len(out) < steps:
        for b in ShardLoader(ds, generator=torch.Generator().manual_seed(cfg.train.seed)):
            out.append(batcher.train_batch(b, len(out), 0))
            if len(out) == steps:
                break
    return out


def plain_loop(cfg, batches: list) -> float:
    """Seconds for all ``batches`` from a fresh model and optimizer."""
    from megarec.engine.deepspeed_setup import WarmupCosine
    from megarec.methods.utgrec.tokenizer import build_model, tokenizer_loss

    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg.utgrec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.train.warmup_steps, len(batches), 0.0))
    model.train()
    start = time.perf_counter()
    for step, (enc, ids, mask, lat, has) in enumerate(batches):
        if step == 0 and cfg.utgrec.codebook.kmeans_init:
            with torch.no_grad():
                model.tree.init_from_data(model.code_inputs(**enc))
        out = model(enc, ids, mask, lat, has, quantize=True)
        loss = tokenizer_loss(out, cfg.utgrec.loss, True)["loss"]
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.tree.restart_dead_codes()
    loss.item()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, small batches (a few minutes)")
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8 quick, 20 full)")
    ap.add_argument("--batch_size", type=int, default=None, help="anchors per step (default 8 quick, 16 full)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 1 quick, 3 full)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (8 if args.quick else 20)
    batch = args.batch_size or (8 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)

    from megarec.data.sample import load_sample
    from megarec.data.shards import write_shards
    from megarec.engine.deepspeed_setup import init_distributed
    from megarec.methods.utgrec.tokenizer_run import run

    init_distributed()
    rows: dict[str, list[float]] = {"plain": [], "megarec": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(load_sample(), shards, max_count=500, images="none", progress=False)
        cfg = make_config(shards, Path(tmp) / "probe", steps, batch)
        batches = plain_batches(cfg, steps)
        n = steps * batch
        for r in range(repeats):
            rows["plain"].append(plain_loop(cfg, batches) / n)
            res = run(make_config(shards, Path(tmp) / f"run{r}", steps, batch))
            rows["megarec"].append(res["train_s"] / n)
            print(f"round {r}: plain {1 / rows['plain'][-1]:.2f} samples/s, megarec {1 / rows['megarec'][-1]:.2f} "
                  f"samples/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    results = [{"loop": k, "samples_per_s": 1.0 / med[k], "ms_per_step": 1000 * med[k] * batch,
                "rounds_samples_per_s": [1.0 / x for x in v]} for k, v in rows.items()]
    summary = {"tokenizer_overhead": med["megarec"] / med["plain"]}
    print(format_table([{k: v for k, v in r.items() if k != "rounds_samples_per_s"} for r in results],
                       ["loop", "samples_per_s", "ms_per_step"]))
    print(f"tokenizer_overhead = {summary['tokenizer_overhead']:.3f} (megarec time per sample / plain; target <= 1.1)")
    Path(args.json).write_text(json.dumps({
        "config": {"quick": args.quick, "steps": steps, "batch_size": batch, "repeats": repeats,
                   "preset": PRESET.name, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "platform": platform.platform()},
        "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
