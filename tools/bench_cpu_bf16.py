"""CPU bf16 autocast vs fp32 for T5 recommender training: step time and training quality.

    python tools/bench_cpu_bf16.py [--quick] [--threads 1] --json bench_cpu_bf16.json

T5 sizes (``cpu-small``: 2 + 2 layers, d_model 64, d_ff 256, 4 heads of 16; ``larger``:
4 + 4 layers, d_model 128, d_ff 512, 4 heads of 32; ``tiger-paper``: 4 + 4 layers, d_model 128,
d_ff 1024, 6 heads of 64), batches of 256 histories of 20 items x
4 code tokens (+ EOS), 4-token targets, codebooks of 256 per level. Per size:

- **speed**: forward + backward + AdamW step, fp32 vs ``torch.autocast("cpu", torch.bfloat16)``,
  steps alternating between the two modes (the machine is shared: load changes hit both
  alike), median over ``--steps`` after ``--warmup`` steps;
- **quality** (``--quality-sizes``, default cpu-small; batch ``--train-batch`` 64 to fit the
  shared machine): the same initial weights trained ``--train-steps`` steps in each mode on a
  learnable synthetic task (the target item is a fixed function of the last history item),
  then evaluated in fp32 on held-out batches: training loss at the end and held-out loss.

bf16 autocast on CPU uses the oneDNN bf16 kernels (AVX512-BF16 / AMX where the CPU has them;
``lscpu`` flags are printed). The output projection stays fp32 (``FP32OutputProjection``).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.data.code_vocab import CodeVocab  # noqa: E402
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig  # noqa: E402

SIZES = {
    "cpu-small": T5RecConfig(num_layers=2, num_decoder_layers=2, d_model=64, d_ff=256, num_heads=4, d_kv=16),
    "larger": T5RecConfig(num_layers=4, num_decoder_layers=4, d_model=128, d_ff=512, num_heads=4, d_kv=32),
    # TIGER's paper T5 (Sec. 4.1: 4 + 4 layers, d_model 128, MLP 1024, 6 heads of 64)
    "tiger-paper": T5RecConfig(num_layers=4, num_decoder_layers=4, d_model=128, d_ff=1024, num_heads=6, d_kv=64),
}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


class Task:
    """Catalogue of ``n_items`` with random 4-level codes; target = item (last history item * 7 + 3) mod n."""

    def __init__(self, n_items: int, levels: int, codebook: int, hist_items: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = CodeVocab([codebook] * levels)
        codes = np.stack([rng.integers(0, codebook, n_items) for _ in range(levels)], 1)
        self.tokens = self.vocab.item_tokens(codes)
        self.n, self.hist_items = n_items, hist_items

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hist = rng.integers(0, self.n, (size, self.hist_items))
        ids, mask = self.vocab.encode_histories(list(hist), self.tokens, max_items=self.hist_items)
        target = (hist[:, -1] * 7 + 3) % self.n
        return ids, mask, torch.from_numpy(self.tokens[target])


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch, bf16: bool) -> float:
    ids, mask, labels = batch
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, mask, labels).loss
    loss.backward()
    opt.step()
    return loss.item()


def make(cfg: T5RecConfig, vocab: CodeVocab, lr: float):
    torch.manual_seed(0)
    model = GenerativeRecommender(cfg, vocab).train()
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def time_steps(cfg: T5RecConfig, task: Task, args) -> dict[str, float]:
    rng = np.random.default_rng(1)
    batches = [task.batch(args.batch, rng) for _ in range(2)]
    runs = {mode: make(cfg, task.vocab, args.lr) for mode in ("fp32", "bf16")}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(args.warmup + args.steps):
        for mode, (model, opt) in runs.items():
            t0 = time.perf_counter()
            step(model, opt, batches[i % 2], mode == "bf16")
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches) -> float:
    model.eval()
    out = statistics.fmean(float(model(ids, mask, labels).loss) for ids, mask, labels in batches)
    model.train()
    return out


def train_quality(cfg: T5RecConfig, task: Task, args) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(2)
    batches = [task.batch(args.train_batch, rng) for _ in range(args.train_steps)]
    held = [task.batch(args.train_batch, np.random.default_rng(3)) for _ in range(2)]
    base, _ = make(cfg, task.vocab, args.lr)
    out = {}
    for mode in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        losses = [step(model, opt, b, mode == "bf16") for b in batches]
        out[mode] = {"first_loss": losses[0], "final_train_loss": statistics.fmean(losses[-5:]),
                     "heldout_loss_fp32_eval": heldout_loss(model, held)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="cpu-small,larger")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--items", type=int, default=2000, help="catalogue size of the synthetic task")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=30, help="training steps per mode for the quality check")
    ap.add_argument("--train-batch", type=int, default=64, help="batch of the quality check")
    ap.add_argument("--quality-sizes", default="cpu-small", help="sizes that get the quality check")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 timed steps, 10 training steps, cpu-small only")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.train_steps, args.sizes = 2, 10, "cpu-small"
    torch.set_num_threads(args.threads)
    task = Task(args.items, levels=4, codebook=256, hist_items=20)
    result = {"machine": {"cpu_bf16_flags": cpu_flags(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "sizes": {}}
    t_start = time.perf_counter()
    for name in args.sizes.split(","):
        cfg = SIZES[name]
        speed = time_steps(cfg, task, args)
        quality = train_quality(cfg, task, args) if name in args.quality_sizes.split(",") else None
        result["sizes"][name] = {"step_s": speed, "speedup_bf16": speed["fp32"] / speed["bf16"],
                                 "quality": quality}
    result["wall_s"] = time.perf_counter() - t_start
    print(f"CPU bf16 flags: {' '.join(result['machine']['cpu_bf16_flags']) or 'none'}; {args.threads} thread(s); "
          f"batch {args.batch}, 20 items x 4 tokens; median of {args.steps} steps")
    print("| size | fp32 step (s) | bf16 step (s) | fp32/bf16 | train loss fp32 | train loss bf16 "
          "| held-out fp32 | held-out bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result["sizes"].items():
        q = r["quality"]
        cols = ([f"{q[m]['final_train_loss']:.3f}" for m in ("fp32", "bf16")]
                + [f"{q[m]['heldout_loss_fp32_eval']:.3f}" for m in ("fp32", "bf16")]) if q else ["-"] * 4
        print(f"| {name} | {r['step_s']['fp32']:.3f} | {r['step_s']['bf16']:.3f} | {r['speedup_bf16']:.2f} | "
              + " | ".join(cols) + " |")
        if q:
            print(f"  {name} quality: first loss {q['fp32']['first_loss']:.3f}, {args.train_steps} steps of batch "
                  f"{args.train_batch}, lr {args.lr}")
    print(f"wall {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
