"""Train and evaluate recommenders on datasets under ../shared/PROTOCOL.md; one markdown table.

    python tools/reproduce.py --data PATH [PATH ...] --methods sasrec,tiger --profile cpu-small \
        --json FILE [--out runs/reproduce] [--seeds 2024]

Each dataset (any format ``megarec.data.readers`` accepts) is one domain, evaluated
on its own: leave-one-out, histories of up to 20 items, full ranking over every item
(beam 20 for TIGER), Recall/NDCG@5/10 averaged over all users, model selection on
validation NDCG@10 with early stopping, one test pass at the best epoch.

- ``sasrec``: RecBole's SASRec config of PROTOCOL.md (2 layers, 2 heads, hidden 64,
  inner 256, dropout 0.5, Adam lr 1e-3 constant, batch 256, CE loss, patience 10);
- ``tiger``: RQ-VAE on the item text (all-MiniLM-L6-v2 embeddings, 3 x 256 codes + the
  dedup token) -> T5 -> trie-constrained beam search.

Profiles (``megarec.train_rec.PROFILES``): ``paper`` (the papers' sizes: T5 6+6 layers,
d_model 128; GPU), ``cpu-small`` (T5 2+2 layers, d_model 64, at most 10 epochs validated every 2;
SASRec at most 80 epochs; RQ-VAE 300 epochs; on Scientific on a shared, loaded 2-core
machine with one thread: SASRec 9 min, TIGER 33 min), ``quickstart`` (the embedded sample),
``tiny`` (smoke test). ``train_s`` is the recommender's training-step time;
``total_s`` the wall time of the whole method (tokenizer, evaluations and test included).
The JSON holds ``"results"``: one object per (method, dataset, seed) with ``method``,
``dataset``, ``seed``, ``recall@5``, ``recall@10``, ``ndcg@5``, ``ndcg@10``, ``train_s``,
``total_s``, ``best_epoch``, ``epochs_run``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.cli import format_table  # noqa: E402

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="dataset folders or files (one domain each)")
    ap.add_argument("--methods", default="sasrec,tiger", help="comma-separated: sasrec, tiger")
    ap.add_argument("--profile", default="cpu-small", help="paper, cpu-small, quickstart or tiny")
    ap.add_argument("--seeds", default="2024", help="comma-separated seeds; several give a mean row too")
    ap.add_argument("--out", default="runs/reproduce", help="run folders go here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed config for the recommender (default: built-in)")
    ap.add_argument("--cpu_threads", type=int, default=0,
                    help="torch threads on CPU (0 = all cores; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)

    from megarec.train_rec import PROFILES, run_pipeline
    from megarec.data.readers import read_domain

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.profile not in PROFILES:
        ap.error(f"--profile: choose from {', '.join(PROFILES)}")
    rows = []
    for path in args.data:
        name = read_domain(path).name           # fail on bad data before training anything
        for method in methods:
            for seed in seeds:
                out = Path(args.out) / args.profile / name / method / f"seed{seed}"
                over = [("train.seed", str(seed)), ("train.cpu_threads", str(args.cpu_threads))]
                if args.deepspeed:
                    over.append(("train.deepspeed", args.deepspeed))
                t0 = time.perf_counter()
                res = run_pipeline(method, [path], out, profile=args.profile, overrides=over,
                                   tokenizer_overrides=[("seed", str(seed))], progress=not args.no_progress)
                row = {"method": method, "dataset": name, "seed": seed,
                       **{k: res["test"][k] for k in METRICS}, "train_s": res["train_s"],
                       "total_s": time.perf_counter() - t0, "best_epoch": res["best_epoch"],
                       "epochs_run": res["epochs_run"], "users": res["test"]["count"], "run_dir": str(out / "rec")}
                rows.append(row)
                print(format_table([{**row, "seed": str(seed)}], ["method", "dataset", "seed", *METRICS, "train_s",
                                                                  "total_s"]), file=sys.stderr)
    table = list(rows)
    if len(seeds) > 1:
        for name in dict.fromkeys(r["dataset"] for r in rows):
            for method in methods:
                group = [r for r in rows if r["dataset"] == name and r["method"] == method]
                table.append({"method": method, "dataset": name, "seed": "mean",
                              **{k: sum(r[k] for r in group) / len(group) for k in (*METRICS, "train_s", "total_s")}})
    print(format_table([{**r, "seed": str(r["seed"])} for r in table],
                       ["method", "dataset", "seed", *METRICS, "train_s", "total_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "seeds": seeds, "platform": platform.platform(),
                                               "results": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
