"""Training throughput of train_rec.py's loop vs a minimal plain PyTorch loop (the stack's overhead).

    python tools/bench_train.py [--quick] --json bench_train.json [--data PATH ...] [--steps N]

Both loops train the same T5 generative recommender (HF ``T5ForConditionalGeneration``
inside :class:`~megarec.recommender.t5.GenerativeRecommender`, same seed) on the same
batches (same samples, same order, same padding) with the same math: AdamW, the same
warmup + cosine LR, gradient clipping at 1.0, fp32, one CPU rank.

- ``plain``: ``loss = model(**batch).loss; loss.backward(); clip_grad_norm_; opt.step();
  sched.step(); opt.zero_grad()`` over batches built before timing;
- ``megarec``: :class:`~megarec.engine.trainer.Trainer` on the DeepSpeed engine
  (ZeRO stage 0 built-in config, as ``megarec train-rec`` runs on one rank) with the TIGER
  method's task: batches collated per step from the tokenised samples, loss kept on
  the device, one host sync, TensorBoard and tqdm update per ``log_every`` steps.
  Its time is the trainer's own ``train_s`` (training steps only, not the epoch-end
  evaluation / checkpoint that follow).

Each round times one epoch of ``--steps`` steps from a fresh model and optimizer in both
loops (first steps included in both).

Data: the embedded sample's domains (or ``--data``) with random unique codes of the
TIGER shape (``--levels`` x ``--codebook``); throughput does not depend on the code
values. Rounds alternate plain / megarec (``--repeats``); each row reports the best
round (on a machine shared with other jobs pass ``--threads 1``: two OpenMP threads
contending with other processes slow both loops down many times, and unevenly).
``summary.train_overhead`` = megarec time per sample / plain time per sample
(target <= 1.1); both loops take the same random batches here (``group_by_length`` off).

Length-grouped batches (second table): one full epoch of TIGER training through the
trainer with the ``cpu-small`` T5 (2 + 2 layers, d_model 64) on Scientific (``--grouped_data``;
the embedded sample with ``--quick``), random batches vs batches grouped by length
(:func:`~megarec.engine.sampler.grouped_epoch_batches`), alternating, ``--grouped_repeats``
rounds each, median epoch time. ``real_token_fraction`` = real encoder tokens / padded
encoder positions over the epoch's batches. ``summary.grouped_speedup`` = random epoch
time / grouped epoch time (target >= 3 on Scientific).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.formatting import format_table  # noqa: E402
from megarec.data.code_sequences import CodeSequenceData  # noqa: E402
from megarec.data.codes import CodesFile  # noqa: E402
from megarec.engine.deepspeed_setup import WarmupCosine  # noqa: E402
from megarec.engine.sampler import epoch_batches  # noqa: E402


def random_codes(domains, levels: int, codebook: int, seed: int = 0) -> CodesFile:
    keys = [f"{d.name}/{i}" for d in domains for i in d.item_ids]
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, codebook, (len(keys), levels))
    return CodesFile(keys, codes, [codebook] * levels)


def plain_loop(model, batches, lr, wd, schedule) -> float:
    """Seconds for all ``batches`` from a fresh optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start = time.perf_counter()
    for b in batches:
        loss = model(b["input_ids"], b["attention_mask"], b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - start


def megarec_loop(cfg, data, run_dir: Path, num_samples: int, schedule, log_every: int) -> float:
    """Seconds of the trainer's training steps over one epoch of ``num_samples`` samples
    (its own ``train_s``: the epoch-end evaluation and checkpoint are not counted)."""
    from megarec.engine.deepspeed_setup import build_engine, device, resolve_ds_config
    from megarec.engine.trainer import LoopConfig, Trainer
    from megarec.methods import tiger

    torch.manual_seed(cfg.train.seed)
    model = tiger.build_model(cfg, data)
    ds = resolve_ds_config(None, micro_batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                           weight_decay=cfg.train.weight_decay)
    engine = build_engine(model, ds, schedule)
    task = tiger.make_task(cfg, data, device(), {})
    task.evaluate = lambda module, split: {"ndcg@10": 0.0}   # time the training loop only
    task.num_samples = num_samples
    task.lengths = task.lengths[:num_samples]
    loop = LoopConfig(epochs=1, batch_size=cfg.train.batch_size, seed=cfg.train.seed, log_every=log_every,
                      progress=True, keep_checkpoints=1, group_by_length=cfg.train.group_by_length)
    return Trainer(engine, task, loop, run_dir).fit()["train_s"]


def real_token_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Real tokens / padded positions when each batch is padded to its longest row."""
    return float(sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches))


def grouped_vs_random(paths: list[str], repeats: int, run_root: Path, batch_size: int = 256,
                      max_samples: int = 0) -> dict:
    """Epoch time of TIGER (cpu-small T5) through the trainer, random vs length-grouped batches."""
    from megarec.config import load_config
    from megarec.data.readers import read_domain
    from megarec.engine.sampler import grouped_epoch_batches
    from megarec.methods.training import TrainRecConfig, profile_layer

    domains = [read_domain(p) for p in paths]
    cfg = load_config(TrainRecConfig, None, [("method", "tiger"), ("train.batch_size", str(batch_size))],
                      base=[profile_layer("tiger", "cpu-small")])
    data = CodeSequenceData(domains, random_codes(domains, 4, 256), max_len=cfg.data.max_len)
    n = min(len(data.train), max_samples) if max_samples else len(data.train)
    lengths = data.train.lengths
    fractions = {"random": real_token_fraction(lengths[:n], epoch_batches(n, batch_size, 0, cfg.train.seed)),
                 "grouped": real_token_fraction(lengths[:n], grouped_epoch_batches(lengths[:n], batch_size, 0,
                                                                                   cfg.train.seed))}
    times: dict[str, list[float]] = {"random": [], "grouped": []}
    for r in range(repeats):
        for mode in ("random", "grouped"):
            cfg.train.group_by_length = mode == "grouped"
            schedule = WarmupCosine(cfg.train.warmup_steps, math.ceil(n / batch_size), 0.0)
            t = megarec_loop(cfg, data, run_root / f"{mode}{r}", n, schedule, 50)
            times[mode].append(t)
            print(f"grouped round {r}: {mode} epoch {t:.1f} s", file=sys.stderr)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"domains": [d.name for d in domains], "train_samples": n, "batch_size": batch_size,
            "rows": [{"batches": k, "real_token_fraction": fractions[k], "epoch_s": med[k],
                      "rounds_epoch_s": times[k]} for k in ("random", "grouped")],
            "grouped_speedup": med["random"] / med["grouped"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (about a minute)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--data", nargs="*", default=None, help="domains (default: the embedded sample)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--levels", type=int, default=4, help="code levels (TIGER: 3 + dedup)")
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--log_every", type=int, default=50)
    ap.add_argument("--grouped_data", nargs="*", default=None,
                    help="domains of the grouped-batches table (default: ../shared/data/amazon/Scientific, "
                         "the embedded sample with --quick)")
    ap.add_argument("--grouped_repeats", type=int, default=None, help="rounds of the grouped-batches table")
    ap.add_argument("--skip_overhead", action="store_true", help="only the grouped-batches table")
    ap.add_argument("--skip_grouped", action="store_true", help="only the overhead table")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the plain loop runs (the trainer follows DS_ACCELERATOR: set it to cuda too)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both loops (0 = torch's default; "
                                                           "use 1 on a machine shared with other jobs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megarec.config import load_config
    from megarec.data.readers import read_domain
    from megarec.data.sample import sample_paths
    from megarec.engine.deepspeed_setup import init_distributed
    from megarec.methods import tiger
    from megarec.methods.training import TrainRecConfig

    steps = args.steps or (20 if args.quick else 30)
    bs = args.batch_size or (64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 2)
    paths = args.data or [str(p) for p in sample_paths()]
    domains = [read_domain(p) for p in paths]
    model_over = ([("tiger.num_layers", "2"), ("tiger.num_decoder_layers", "2")] if args.quick else [])
    cfg = load_config(TrainRecConfig, None, [("method", "tiger"), ("train.batch_size", str(bs)),
                                             ("train.warmup_steps", "10"), ("train.lr", "1e-3"),
                                             ("train.group_by_length", "false"), *model_over])
    data = CodeSequenceData(domains, random_codes(domains, args.levels, args.codebook), max_len=cfg.data.max_len)
    steps = min(steps, len(data.train) // bs)
    if steps < 2:
        raise SystemExit(f"only {len(data.train)} training samples: too few for batch {bs}")
    init_distributed()
    n = steps * bs
    # the plain loop gets exactly the batches the trainer draws for its epoch 0
    batches = [data.train.batch(idx, args.device) for idx in epoch_batches(n, bs, epoch=0, seed=cfg.train.seed)]
    schedule = WarmupCosine(cfg.train.warmup_steps, steps, 0.0)
    rows: dict[str, list[float]] = {"plain": [], "megarec": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(0 if args.skip_overhead else repeats):
            torch.manual_seed(cfg.train.seed)
            model = tiger.build_model(cfg, data).to(args.device)
            rows["plain"].append(plain_loop(model, batches, cfg.train.lr, cfg.train.weight_decay, schedule) / n)
            rows["megarec"].append(megarec_loop(cfg, data, Path(tmp) / f"run{r}", n, schedule, args.log_every) / n)
            print(f"round {r}: plain {1 / rows['plain'][-1]:.1f} samples/s, megarec {1 / rows['megarec'][-1]:.1f} "
                  f"samples/s", file=sys.stderr)
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon" / "Scientific"
        gpaths = args.grouped_data or ([str(p) for p in sample_paths()] if args.quick or not shared.exists()
                                       else [str(shared)])
        grouped = None if args.skip_grouped else grouped_vs_random(
            gpaths, args.grouped_repeats or (1 if args.quick else 2), Path(tmp) / "grouped")
    summary: dict[str, float] = {}
    results = []
    if rows["plain"]:
        best = {k: min(v) for k, v in rows.items()}
        results = [{"loop": k, "samples_per_s": 1.0 / best[k], "ms_per_step": 1000 * best[k] * bs,
                    "rounds_samples_per_s": [1.0 / x for x in v]} for k, v in rows.items()]
        summary.update({"train_overhead": best["megarec"] / best["plain"],
                        "megarec_samples_per_s": 1.0 / best["megarec"], "plain_samples_per_s": 1.0 / best["plain"]})
        print(format_table([{k: v for k, v in r.items() if k != "rounds_samples_per_s"} for r in results],
                           ["loop", "samples_per_s", "ms_per_step"]))
        print(f"train_overhead = {summary['train_overhead']:.3f} (megarec time per sample / plain; target <= 1.1)")
    if grouped is not None:
        summary["grouped_speedup"] = grouped["grouped_speedup"]
        print(format_table(grouped["rows"], ["batches", "real_token_fraction", "epoch_s"]))
        print(f"grouped_speedup = {grouped['grouped_speedup']:.2f} (random / grouped epoch time, "
              f"{'+'.join(grouped['domains'])}, {grouped['train_samples']} samples; target >= 3 on Scientific)")
    n_params = sum(p.numel() for p in tiger.build_model(cfg, data).parameters())
    if args.json:
        out = {"config": {"quick": args.quick, "steps": steps, "batch_size": bs, "repeats": repeats,
                          "domains": [d.name for d in domains], "train_samples": len(data.train),
                          "levels": args.levels, "codebook": args.codebook, "parameters": n_params,
                          "t5": {k: getattr(cfg.tiger, k) for k in ("num_layers", "num_decoder_layers", "d_model",
                                                                    "d_ff", "num_heads")},
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "platform": platform.platform()},
               "results": results, "grouped": grouped, "summary": summary}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
