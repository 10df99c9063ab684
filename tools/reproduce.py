"""Train and evaluate recommenders on datasets under ../shared/PROTOCOL.md; one markdown table.

    python tools/reproduce.py --data PATH [PATH ...] --methods sasrec,tiger --profile cpu-small \
        --json FILE [--out runs/reproduce] [--seeds 2024]
    python tools/reproduce.py --data TARGET --pretrain DOMAIN [DOMAIN ...] --methods utgrec,utgrec-nopt ...

Each dataset (any format ``megarec.data.readers`` accepts) is one domain, evaluated
on its own: leave-one-out, histories of up to 20 items, full ranking over every item
(beam 20 for TIGER), Recall/NDCG@5/10 averaged over all users, model selection on
validation NDCG@10 with early stopping, one test pass at the best epoch.

- ``sasrec``: RecBole's SASRec config of PROTOCOL.md (2 layers, 2 heads, hidden 64,
  inner 256, dropout 0.5, Adam lr 1e-3 constant, batch 256, CE loss, patience 10);
- ``tiger``: RQ-VAE on the item text (all-MiniLM-L6-v2 embeddings, 3 x 256 codes + the
  dedup token) -> T5 -> trie-constrained beam search.

- ``utgrec``: UTGRec's transfer pipeline (docs/README_utgrec.md): tokenizer and T5 pre-trained
  on the ``--pretrain`` domains (the dataset itself is left out of them), both fine-tuned on the
  dataset; ``utgrec-nopt`` (an alias, :data:`ALIASES`): the same with no pre-training (the
  paper's "w/o PT": tokenizer trained on the dataset only, T5 from scratch). The pre-training
  runs once per set of pre-training domains, with the first seed, in ``OUT/PROFILE/pretrain/``
  (as one pre-trained model is transferred to many targets); the seeds vary everything on the
  target (tokenizer fine-tuning, T5 fine-tuning). ``--pretrain_per_seed`` pre-trains per seed.

Profiles (``megarec/configs/<method>/<profile>.yaml``): ``paper`` (the papers' sizes: T5 6+6 layers,
d_model 128; GPU), ``cpu-small`` (TIGER: T5 2+2 layers, d_model 64, length-grouped batches of 64,
up to 40 epochs validated every 2; SASRec at most 80 epochs; RQ-VAE 300 epochs; see the README for
measured times), ``quickstart`` (the embedded sample),
``tiny`` (smoke test). ``train_s`` is the recommender's training-step time;
``total_s`` the wall time of the whole method (tokenizer, evaluations and test included).
The JSON holds ``"results"``: one object per (method, dataset, seed) with ``method``,
``dataset``, ``seed``, ``recall@5``, ``recall@10``, ``ndcg@5``, ``ndcg@10``, ``train_s``,
``total_s``, ``best_epoch``, ``epochs_run``; and ``"skipped"``: the (method, dataset) pairs that
cannot run, with the reason (a method that needs item text on a domain without any, e.g. TIGER
or UniGRec on Instruments: reported, and the other runs go on).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.formatting import format_table  # noqa: E402

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")

# Method variants: name -> (registered method, run-config overrides applied after --pretrain / --set's).
ALIASES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "utgrec-nopt": ("utgrec", [("utgrec.pretrain_paths", "")]),   # no pre-training domains ("w/o PT")
}


def resolve_method(name: str) -> tuple[str, list[tuple[str, str]]]:
    """``(registered method, its extra overrides)`` of a ``--methods`` entry (an alias or a method)."""
    return ALIASES.get(name, (name, []))


def pretrain_overrides(method: str, pretrain: dict[str, str], target: str,
                       shared: tuple[Path, int] | None = None) -> list[tuple[str, str]]:
    """``--pretrain`` (resolved path -> domain name) as an override of the plug-in's ``pretrain_key``
    (e.g. ``utgrec.pretrain_paths``), the target itself left out; nothing for methods without
    pre-training domains. ``shared`` = ``(root, seed)``: the pre-training stages go to
    ``root/<method>/<name+name>`` with that seed (the plug-in's ``pretrain_dir_key`` /
    ``pretrain_seed_key``), so the seeds of a table, and the targets with the same pre-training
    domains, share one pre-training."""
    from megarec.methods import get_method

    plugin = get_method(method)
    key = getattr(plugin, "pretrain_key", None)
    if not key or not pretrain:
        return []
    others = {p: name for p, name in pretrain.items() if p != str(Path(target).resolve())}
    over = [(key, ",".join(others))]
    if shared and getattr(plugin, "pretrain_dir_key", None) and others:
        root, seed = shared
        over += [(plugin.pretrain_dir_key, str(root / method / "+".join(sorted(others.values())))),
                 (plugin.pretrain_seed_key, str(seed))]
    return over


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="dataset folders or files (one domain each)")
    ap.add_argument("--methods", default="sasrec,tiger",
                    help="comma-separated registered methods (sasrec, tiger, etegrec, unigrec, utgrec) or aliases "
                         f"({', '.join(ALIASES)})")
    ap.add_argument("--pretrain", nargs="+", default=[], metavar="PATH",
                    help="pre-training domains of methods that transfer (utgrec); each --data dataset is left "
                         "out of its own pre-training set")
    ap.add_argument("--pretrain_per_seed", action="store_true",
                    help="pre-train once per seed, in each seed's folder (default: once per set of pre-training "
                         "domains, with the first seed, under OUT/PROFILE/pretrain/; the seeds vary the target's "
                         "fine-tuning)")
    ap.add_argument("--pretrain_seed", type=int, default=None,
                    help="seed of the shared pre-training (default: the first of --seeds); give the same one to "
                         "every process when the seeds of a table run in separate processes (a different seed is "
                         "a different pre-training, and a rerun with changed settings replaces a stage's folder)")
    ap.add_argument("--profile", default="cpu-small", help="paper, cpu-small, quickstart or tiny")
    ap.add_argument("--seeds", default="2024", help="comma-separated seeds; several give a mean row too")
    ap.add_argument("--out", default="runs/reproduce", help="run folders go here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--results", default=None, metavar="DIR",
                    help="also write one run record per run, DIR/<dataset>/<method>/seed<seed>.json (config, commit, "
                         "metrics, validation history, best epoch, seconds, codebook statistics): the data behind a "
                         "README table (tools/results_table.py)")
    ap.add_argument("--variant", default="", help="label of this table's runs in their records (an ablation, "
                                                  "e.g. 'w/o AT'); the rows are 'METHOD (VARIANT)'")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed config for the recommender (default: built-in)")
    ap.add_argument("--cpu_threads", type=int, default=0,
                    help="torch threads on CPU (0 = all cores; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="continue recommender runs that were stopped, from their checkpoints (a run without "
                         "checkpoints starts from scratch; the pipeline stages before it resume by themselves)")
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="extra run-config override on top of the profile, e.g. --set train.epochs 30 "
                         "(repeatable; reported in the JSON)")
    ap.add_argument("--stage-set", nargs=3, action="append", default=[], metavar=("STAGE", "KEY", "VALUE"),
                    help="override of a pipeline stage's setting, e.g. --stage-set tokenizer encoder DIR")
    args = ap.parse_args(argv)

    from megarec.config import ConfigError
    from megarec.data.domain import MissingTextError
    from megarec.data.readers import read_domain
    from megarec.methods import method_names
    from megarec.methods.profiles import load_profile
    from megarec.methods.training import run_pipeline
    from megarec.results import run_record, write_record

    if args.pretrain_seed is not None and args.pretrain_per_seed:
        ap.error("--pretrain_seed names the seed of one shared pre-training; --pretrain_per_seed pre-trains with "
                 "each seed")
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for m in methods:
        base = resolve_method(m)[0]
        if base not in method_names():
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join((*method_names(), *ALIASES))}")
        try:
            load_profile(base, args.profile)
        except ConfigError as e:
            ap.error(f"--profile: {e}")
    rows, skipped = [], []
    shared = None if args.pretrain_per_seed else (Path(args.out).resolve() / args.profile / "pretrain",
                                                  seeds[0] if args.pretrain_seed is None else args.pretrain_seed)
    # read once: fails on bad data before training anything, and names the shared pre-training folder
    pretrain = {str(Path(p).resolve()): read_domain(p).name for p in args.pretrain}
    for path in args.data:
        name = read_domain(path).name           # fail on bad data before training anything
        for method in methods:
            for seed in seeds:
                out = Path(args.out) / args.profile / name / method / f"seed{seed}"
                base, alias_over = resolve_method(method)
                over = [("train.seed", str(seed)), ("train.cpu_threads", str(args.cpu_threads)),
                        *pretrain_overrides(base, pretrain, path, shared),
                        *[(k, v) for k, v in args.set], *alias_over]
                if args.resume:
                    over.append(("train.resume", "true"))
                if args.deepspeed:
                    over.append(("train.deepspeed", args.deepspeed))
                t0 = time.perf_counter()
                stage_over: dict[str, list[tuple[str, str]]] = {}
                for stage, k, v in args.stage_set:
                    stage_over.setdefault(stage, []).append((k, v))
                try:
                    res = run_pipeline(base, [path], out, profile=args.profile, overrides=over,
                                       stage_overrides=stage_over, progress=not args.no_progress)
                except MissingTextError as e:
                    print(f"skipped {method} on {name}: {e}", file=sys.stderr)
                    skipped.append({"method": method, "dataset": name, "reason": str(e)})
                    break                                # the other seeds cannot run either
                row = {"method": method, "dataset": name, "seed": seed,
                       **{k: res["test"][k] for k in METRICS}, "train_s": res["train_s"],
                       "total_s": time.perf_counter() - t0, "best_epoch": res["best_epoch"],
                       "epochs_run": res["epochs_run"], "users": res["test"]["count"], "run_dir": str(out / "rec")}
                rows.append(row)
                if args.results:
                    stage_keys = [(f"stages.{st}.{k}", v) for st, k, v in args.stage_set]
                    record = run_record(method, name, seed, args.profile, over + stage_keys, res, out / "rec",
                                        row["total_s"])
                    if args.variant:
                        record["variant"] = args.variant
                    write_record(record, args.results)
                print(format_table([{**row, "seed": str(seed)}], ["method", "dataset", "seed", *METRICS, "train_s",
                                                                  "total_s"]), file=sys.stderr)
    table = list(rows)
    if len(seeds) > 1:
        for name in dict.fromkeys(r["dataset"] for r in rows):
            for method in methods:
                group = [r for r in rows if r["dataset"] == name and r["method"] == method]
                if not group:
                    continue
                table.append({"method": method, "dataset": name, "seed": "mean",
                              **{k: sum(r[k] for r in group) / len(group) for k in (*METRICS, "train_s", "total_s")}})
    print(format_table([{**r, "seed": str(r["seed"])} for r in table],
                       ["method", "dataset", "seed", *METRICS, "train_s", "total_s"]))
    for sk in skipped:
        print(f"skipped: {sk['method']} on {sk['dataset']} ({sk['reason']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "overrides": args.set, "seeds": seeds,
                                               "pretrain": args.pretrain, "platform": platform.platform(),
                                               "results": rows, "table": table, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
