"""``megarec quickstart``: everything MegaRec has, end to end, on the embedded sample, on CPU.

Stages (each writes its files under ``out``, TensorBoard logs under ``out``):

1. data: the three embedded domains (real Amazon reviews) -> Table-1 statistics;
2. shards: WebDataset item shards with deterministic placeholder images, read back once
   through the rank/worker-splitting reader;
3. recommenders: per domain, SASRec (item ids) and TIGER (RQ-VAE codes from item text ->
   T5 -> trie-constrained beam search), each trained, selected on validation and tested
   under the leave-one-out full-ranking protocol (PROTOCOL.md); with ``utgrec`` in
   ``methods``, UTGRec's transfer pipeline: tokenizer and T5 pre-trained on the two other
   sample domains, both fine-tuned on the domain (docs/README_utgrec.md);
4. a Recall/NDCG table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from megarec.data.domain import DataError
from megarec.distributed import get_logger

METRIC_COLS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]


def _stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def transfer_overrides(method: str, target: str, paths: dict[str, Path]) -> list[tuple[str, str]]:
    """For a method that pre-trains on other domains (its plug-in names the run-config key in
    ``pretrain_key``, e.g. UTGRec's ``utgrec.pretrain_paths``): every other sample domain."""
    from megarec.methods import get_method

    key = getattr(get_method(method), "pretrain_key", None)
    if not key:
        return []
    return [(key, ",".join(str(p) for n, p in paths.items() if n != target))]


def check_arguments(methods: Sequence[str], profile: str, domains: Sequence[str] | None,
                    out: Path) -> tuple[list[str], dict[str, Path]]:
    """``(chosen domain names, every sample domain's folder by name)`` once each method, its profile and each
    domain is known to be valid: every run's config is built as :func:`~megarec.methods.training.run_pipeline`
    builds it, before any statistics, shards or training (a ConfigError / DataError naming the bad argument
    and the choices otherwise)."""
    from megarec.config import ConfigError
    from megarec.data.sample import sample_paths
    from megarec.methods import method_names
    from megarec.methods.training import pipeline_config

    paths = {p.name: p for p in sample_paths()}
    names = list(domains) if domains else list(paths)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise DataError(f"no sample domain {unknown}; the sample has {', '.join(paths)}")
    if not methods:
        raise ConfigError(f"--methods: give at least one of {', '.join(method_names())}")
    for name in names:
        for method in methods:   # unknown method or profile: ConfigError listing the choices
            pipeline_config(method, [paths[name]], out / name / method, profile,
                            transfer_overrides(method, name, paths), progress=False)
    return names, paths


def run_quickstart(out: str | Path = "runs/quickstart", methods: Sequence[str] = ("sasrec", "tiger"),
                   profile: str = "quickstart", domains: Sequence[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run the quickstart; returns ``{"stats": [...], "shards": {...}, "results": [...]}`` (also in summary.json)."""
    from torch.utils.tensorboard import SummaryWriter

    from megarec.data.sample import load_sample
    from megarec.formatting import format_table
    from megarec.data.shards import ShardDataset, write_shards
    from megarec.methods.training import run_pipeline

    log = get_logger("megarec.quickstart")
    out = Path(out)
    names, paths = check_arguments(methods, profile, domains, out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    _stage("1/4 data: embedded sample (real Amazon reviews)")
    sample = load_sample()
    chosen = [d for d in sample if d.name in names]
    stats = [d.stats() for d in chosen]
    print(format_table(stats, ["domain", "users", "items", "interactions", "avg_len", "sparsity"]))
    tb = SummaryWriter(str(out / "data"))
    for row in stats:
        for key in ("users", "items", "interactions", "avg_len", "sparsity"):
            tb.add_scalar(f"data/{row['domain']}/{key}", row[key], 0)
    tb.close()

    _stage("2/4 shards: WebDataset tar shards with placeholder images")
    shard_dir = out / "shards"
    shard_paths = write_shards(chosen, shard_dir, max_count=500, images="placeholder", overwrite=True,
                               progress=progress)
    reader = ShardDataset(shard_dir, batch_size=64, shuffle=True, seed=0)
    seen = 0
    for batch in reader:
        seen += len(batch["key"])
    shard_summary = {"shards": len(shard_paths), "items_written": sum(d.num_items for d in chosen),
                     "items_read": seen, "bad_samples": reader.bad_samples}
    print(f"{shard_summary['shards']} shards, {shard_summary['items_written']} items written, "
          f"{seen} read back, {reader.bad_samples} bad samples -> {shard_dir}")

    _stage("3/4 recommenders: " + ", ".join(methods) + f" (profile {profile!r})")
    results = []
    for name in names:
        for method in methods:
            log.info("training %s on %s", method, name)
            t = time.perf_counter()
            res = run_pipeline(method, [paths[name]], out / name / method, profile=profile,
                               overrides=transfer_overrides(method, name, paths), progress=progress)
            row = {"method": method, "dataset": name, **{k: res["test"][k] for k in METRIC_COLS},
                   "train_s": int(round(time.perf_counter() - t))}
            results.append(row)

    _stage("4/4 results: leave-one-out, full ranking, test split (PROTOCOL.md)")
    print(format_table(results, ["method", "dataset", *METRIC_COLS, "train_s"]))
    summary = {"stats": stats, "shards": shard_summary, "results": results, "profile": profile,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndone in {summary['seconds']} s; outputs in {out}; watch with: tensorboard --logdir {out.parent}")
    return summary
