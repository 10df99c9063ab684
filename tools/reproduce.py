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
or UniGRec on Instruments: reported, and the other runs go on). Every argument (methods, profile, seeds,
each --data / --pretrain dataset, overrides, the DeepSpeed config, the JSON's folder) is checked before the
first training starts.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

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


def parse_methods(text: str, profile: str) -> list[str]:
    """The ``--methods`` entries, each a registered method or an alias with ``profile`` shipped for it."""
    from megarec.config import ConfigError
    from megarec.methods import method_names
    from megarec.methods.profiles import load_profile

    methods = [m.strip() for m in text.split(",") if m.strip()]
    choices = ", ".join((*method_names(), *ALIASES))
    if not methods:
        raise ConfigError(f"--methods: give at least one of {choices}")
    for m in methods:
        base = resolve_method(m)[0]
        if base not in method_names():
            raise ConfigError(f"--methods: unknown method {m!r}; choose from {choices}")
        try:
            load_profile(base, profile)
        except ConfigError as e:
            raise ConfigError(f"--profile: {e}") from e
    return methods


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated non-negative integers, at least one."""
    from megarec.config import ConfigError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, e.g. 2024,2025; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds: expected comma-separated integers >= 0, e.g. 2024,2025; got {text!r}")
    return seeds


def read_names(paths: list[str], flag: str) -> dict[str, str]:
    """Resolved path -> domain name of every path, each read once (a missing or unreadable one is a
    DataError naming ``flag``); two paths that are one domain would share their run folders: a ConfigError."""
    from megarec.config import ConfigError
    from megarec.data.domain import DataError
    from megarec.data.readers import read_domain

    names: dict[str, str] = {}
    for p in paths:
        try:
            name = read_domain(p).name
        except DataError as e:
            raise DataError(f"{flag} {p}: {e}") from e
        if name in names.values():
            raise ConfigError(f"{flag}: domain {name!r} is given twice ({p}); every dataset needs its own name")
        names[str(Path(p).resolve())] = name
    return names


class Run(NamedTuple):
    """One (dataset, method, seed) of the table and what ``run_pipeline`` gets for it."""

    path: str
    name: str
    method: str                  # as given (an alias or a method)
    base: str                    # the registered method
    seed: int
    out: Path
    overrides: list[tuple[str, str]]
    stage_overrides: dict[str, list[tuple[str, str]]]


def plan_runs(args: argparse.Namespace, methods: list[str], seeds: list[int], data: dict[str, str],
              pretrain: dict[str, str]) -> list[Run]:
    """Every run of the table, its config built and checked as ``run_pipeline`` will (overrides, the DeepSpeed
    config, the JSON output's folder), so a bad argument stops the script before the first training."""
    from megarec.config import ConfigError
    from megarec.methods.training import check_inputs, pipeline_config

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ConfigError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    shared = None if args.pretrain_per_seed else (Path(args.out).resolve() / args.profile / "pretrain",
                                                  seeds[0] if args.pretrain_seed is None else args.pretrain_seed)
    stage_over: dict[str, list[tuple[str, str]]] = {}
    for stage, k, v in args.stage_set:
        stage_over.setdefault(stage, []).append((k, v))
    runs = []
    for path, name in data.items():
        for method in methods:
            for seed in seeds:
                base, alias_over = resolve_method(method)
                over = [("train.seed", str(seed)), ("train.cpu_threads", str(args.cpu_threads)),
                        *pretrain_overrides(base, pretrain, path, shared), *[(k, v) for k, v in args.set],
                        *alias_over]
                if args.resume:
                    over.append(("train.resume", "true"))
                if args.deepspeed:
                    over.append(("train.deepspeed", args.deepspeed))
                out = Path(args.out) / args.profile / name / method / f"seed{seed}"
                check_inputs(pipeline_config(base, [path], out, args.profile, over, progress=False))
                runs.append(Run(path, name, method, base, seed, out, over, stage_over))
    return runs


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
    from megarec.data.domain import DataError, MissingTextError
    from megarec.methods.training import run_pipeline
    from megarec.results import run_record, write_record

    if args.pretrain_seed is not None and args.pretrain_per_seed:
        ap.error("--pretrain_seed names the seed of one shared pre-training; --pretrain_per_seed pre-trains with "
                 "each seed")
    try:   # every argument checked before the first training starts
        methods, seeds = parse_methods(args.methods, args.profile), parse_seeds(args.seeds)
        data, pretrain = read_names(args.data, "--data"), read_names(args.pretrain, "--pretrain")
        runs = plan_runs(args, methods, seeds, data, pretrain)
    except (ConfigError, DataError) as e:
        ap.error(str(e))
    rows, skipped = [], []
    for run in runs:
        if any(sk["method"] == run.method and sk["dataset"] == run.name for sk in skipped):
            continue                                     # the other seeds cannot run either
        t0 = time.perf_counter()
        try:
            res = run_pipeline(run.base, [run.path], run.out, profile=args.profile, overrides=run.overrides,
                               stage_overrides=run.stage_overrides, progress=not args.no_progress)
        except MissingTextError as e:
            print(f"skipped {run.method} on {run.name}: {e}", file=sys.stderr)
            skipped.append({"method": run.method, "dataset": run.name, "reason": str(e)})
            continue
        row = {"method": run.method, "dataset": run.name, "seed": run.seed,
               **{k: res["test"][k] for k in METRICS}, "train_s": res["train_s"],
               "total_s": time.perf_counter() - t0, "best_epoch": res["best_epoch"],
               "epochs_run": res["epochs_run"], "users": res["test"]["count"], "run_dir": str(run.out / "rec")}
        rows.append(row)
        if args.results:
            stage_keys = [(f"stages.{st}.{k}", v) for st, k, v in args.stage_set]
            record = run_record(run.method, run.name, run.seed, args.profile, [*run.overrides, *stage_keys], res,
                                run.out / "rec", row["total_s"])
            if args.variant:
                record["variant"] = args.variant
            write_record(record, args.results)
        print(format_table([{**row, "seed": str(run.seed)}], ["method", "dataset", "seed", *METRICS, "train_s",
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
