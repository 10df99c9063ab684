"""Paper scale, rehearsed on this machine: the 2B UTGRec tokenizer under ZeRO-3 and a 10^5-item catalogue.

    python tools/bench_scale.py [--quick] [--parts catalogue,tokenizer,data] --json FILE [--work DIR]

Three parts (all run on a 2-core, 24 GB CPU machine; ``--quick``: reduced sizes, under 10 minutes):

- **catalogue** (``tools/scale_catalogue.py``): a synthetic raw Amazon-2023 set of the UTGRec
  pre-training size (1M users, 344k items, 8.6M interactions; quick: 150k / 50k / 1.25M) through
  reading + 5-core, splits, an RQ-VAE, code assignment with collision resolution, the code-sequence
  dataset, the trie, the paper-size T5 for a fixed number of steps, beam search and full-ranking
  evaluation on a 10k-user sample. Keys ``catalogue.<stage>.s`` / ``catalogue.<stage>.gb``.
- **tokenizer** (``tools/scale_tokenizer.py``): Qwen2-VL-2B's exact configuration (``random_init``)
  through ``train_tokenizer.py`` at 1 and 2 CPU ranks under ZeRO-3, per-rank host memory beside
  :mod:`megarec.engine.memory_model`'s prediction.
- **data** (``tools/scale_data.py``): the tokenizer's training data path at the paper run's sizes
  (500 px JPEGs, 224 px encoder images, cached 256 px VAE latents, batch 16 + 16 positives): items/s per
  DataLoader worker, beside the items/s one H200 would consume at an assumed MFU.

Prints one table per part and writes every figure to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("catalogue", "tokenizer", "data")


def cpu_summary() -> dict[str, object]:
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    import os

    return {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags)}


def catalogue_table(res: dict) -> str:
    rows = ["| stage | seconds | peak host GB | notes |", "|---|---|---|---|"]
    for name, info in res.items():
        if not isinstance(info, dict) or "s" not in info:
            continue
        notes = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("s", "gb"))
        rows.append(f"| {name} | {info['s']:.1f} | {info['gb']:.2f} | {notes} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes (the test that guards this script)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long sizes (tests/test_bench_scale.py)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the catalogue part")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="print the tables of earlier runs' JSON files (the README's tables) and exit")
    ap.add_argument("--repredict", action="store_true",
                    help="with --render: recompute the tokenizer's predictions with the current memory model "
                         "(measurements untouched) and write each file back, the model's commit beside them")
    ap.add_argument("--reuse", action="store_true", help="tokenizer: keep finished runs in --work, run the rest")
    ap.add_argument("--rqvae-epochs", type=int, default=2)
    ap.add_argument("--t5-steps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.render:
        import scale_tokenizer

        from megarec.results import commit_of

        for path in args.render:
            res = json.loads(Path(path).read_text())
            if args.repredict and "tokenizer" in res:
                res["tokenizer"] = scale_tokenizer.repredict(res["tokenizer"])
                res["predictions_from"] = {"command": "python tools/bench_scale.py --render FILE --repredict",
                                           **commit_of(Path(__file__))}
                Path(path).write_text(json.dumps(res, indent=2))
            if "catalogue" in res:
                print(catalogue_table(res["catalogue"]))
            if "tokenizer" in res:
                print(scale_tokenizer.table(res["tokenizer"]))
            if "data" in res:
                import scale_data

                print(scale_data.table(res["data"]))
        return {}
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    import torch

    torch.set_num_threads(args.threads)
    from megarec.results import commit_of

    out: dict = {"quick": args.quick, "tiny": args.tiny, "cpu": cpu_summary(), "torch_threads": args.threads,
                 "command": " ".join(["python", "tools/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
                 **commit_of(Path(__file__))}
    size = "tiny" if args.tiny else "quick" if args.quick else "paper"   # of the tokenizer and data parts
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if "catalogue" in parts:
            import scale_catalogue

            sizes = (scale_catalogue.TINY if args.tiny else scale_catalogue.QUICK if args.quick
                     else scale_catalogue.PAPER)
            small = args.quick or args.tiny
            print(f"catalogue: {sizes}", flush=True)
            # tiny: one RQ-VAE step per epoch, so more epochs for codes that resolve (the assertion checks it)
            res = scale_catalogue.run(work / "catalogue", sizes, rqvae_epochs=40 if args.tiny else args.rqvae_epochs,
                                      t5_steps=2 if args.tiny else 3 if small else args.t5_steps,
                                      eval_users=200 if args.tiny else 2000 if small else 10_000,
                                      text_sample=32 if args.tiny else 512)
            out["catalogue"] = res
            print(catalogue_table(res))
        if "tokenizer" in parts:
            import scale_tokenizer

            out["tokenizer"] = scale_tokenizer.run(work / "tokenizer", size=size, reuse=args.reuse)
            print(scale_tokenizer.table(out["tokenizer"]))
        if "data" in parts:
            import scale_data

            out["data"] = scale_data.run(work / "data", size=size, items=32 if args.tiny else 256,
                                         seconds=2 if args.tiny else 20)
            print(scale_data.table(out["data"]))
    out["wall_s"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
