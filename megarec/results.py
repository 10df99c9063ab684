"""Results as data: one JSON record per run, and the markdown tables rendered from them.

``tools/reproduce.py --results DIR`` writes ``DIR/<dataset>/<method>/seed<seed>.json`` per run
(:func:`run_record`: method, dataset, seed, profile, overrides, the run's config, commit, test
metrics, validation history, best epoch, epochs run, seconds, codebook statistics, machine).
``tools/results_table.py`` renders each table folder ``docs/results/<table>/`` (every record under it,
plus an optional ``published.json`` of the papers' rows) and writes or checks the README block
between ``<!-- results:<table> -->`` and ``<!-- /results:<table> -->``; a test checks that the README
equals the rendering, so every figure there can be traced to its run.
"""
from __future__ import annotations

import json
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence

FORMAT = "megarec-run/1"
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
LABELS = {"recall@5": "Recall@5", "recall@10": "Recall@10", "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}
METHOD_NAMES = {"sasrec": "SASRec", "tiger": "TIGER", "etegrec": "ETEGRec", "unigrec": "UniGRec", "utgrec": "UTGRec"}


# --------------------------------------------------------------------------- records
def commit_of(path: str | Path) -> dict[str, Any]:
    """The git commit of the checkout holding ``path`` and whether its tracked files had changes."""
    cwd = Path(path).resolve()
    cwd = cwd if cwd.is_dir() else cwd.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def cpu_name() -> str:
    """The CPU model and whether it has bf16 units (AVX512-BF16 / AMX), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = set((re.search(r"flags\s*:\s*(.+)", info) or [None, ""])[1].split())
    bf16 = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no bf16"
    return f"{name.group(1).strip() if name else platform.processor()} ({bf16})"


def codebook_summary(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Collision rates and per-level perplexity / usage of a codes file's statistics (None without codes)."""
    if not stats or "collision_rate_before" not in stats:
        return None
    out = {k: stats[k] for k in ("collision_rate_before", "collision_rate_after", "policy", "num_items")
           if k in stats}
    for name in ("levels_before", "levels"):
        if name in stats:
            out[f"perplexity_{name}"] = [round(lv["perplexity"], 2) for lv in stats[name]]
            out[f"usage_{name}"] = [round(lv["usage"], 4) for lv in stats[name]]
    return out


def run_record(method: str, dataset: str, seed: int, profile: str, overrides: Sequence[tuple[str, str]],
               result: dict[str, Any], run_dir: str | Path, seconds: float,
               commit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of one pipeline run: ``result`` is :func:`megarec.methods.training.run_pipeline`'s
    (``metrics.json`` plus each stage's statistics), ``run_dir`` the recommender's run folder; ``commit``
    defaults to this checkout's (:func:`commit_of`)."""
    import yaml

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    stages = {k: v for k, v in result.items() if isinstance(v, dict) and k not in ("test",)}
    return {
        "format": FORMAT, "method": method, "dataset": dataset, "seed": int(seed), "profile": profile,
        "overrides": [list(o) for o in overrides],
        "test": {k: result["test"][k] for k in (*METRICS, "count") if k in result["test"]},
        "best_epoch": result["best_epoch"], "best_valid": result.get("best_valid"), "metric": result.get("metric"),
        "epochs_run": result["epochs_run"], "valid_history": result.get("valid_history", []),
        "train_s": round(float(result["train_s"]), 1), "total_s": round(float(seconds), 1),
        "resumed_from_step": result.get("resumed_from_step"),
        "codebook": {k: s for k, v in stages.items() if (s := codebook_summary(v.get("codes", v)))},
        "config": yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None,
        **(commit or commit_of(Path(__file__))), "cpu": cpu_name(), "platform": platform.platform(),
    }


def write_record(record: dict[str, Any], folder: str | Path) -> Path:
    """``folder/<dataset>/<method>/seed<seed>.json``."""
    path = Path(folder) / record["dataset"] / record["method"] / f"seed{record['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """Every run record under ``folder`` (``published.json`` excluded), in path order."""
    out = []
    for p in sorted(Path(folder).rglob("*.json")):
        if p.name == "published.json":
            continue
        rec = json.loads(p.read_text())
        if rec.get("format") != FORMAT:
            raise ValueError(f"{p}: not a run record (format {rec.get('format')!r}, expected {FORMAT!r})")
        out.append(rec)
    return out


# --------------------------------------------------------------------------- tables
def _label(rec: dict[str, Any]) -> str:
    """A row's method label: the method, plus the ``variant`` a record may name (an ablation)."""
    name = METHOD_NAMES.get(rec["method"], rec["method"])
    return f"{name} ({rec['variant']})" if rec.get("variant") else name


def _groups(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], _label(r)), []).append(r)
    return groups


def render_table(records: Sequence[dict[str, Any]], published: Sequence[dict[str, Any]] = ()) -> str:
    """Per-run rows, a mean row per (dataset, method) with several seeds (and the sd of NDCG@10), the
    published rows, and the ratio of our mean to each published row of the same method."""
    head = ["method", "dataset", "seed", *(LABELS[m] for m in METRICS), "best epoch / run", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = _groups(records)
    for (dataset, label), recs in groups.items():
        for r in sorted(recs, key=lambda r: r["seed"]):
            lines.append(f"| {label} | {dataset} | {r['seed']} | " + " | ".join(f"{r['test'][m]:.4f}" for m in METRICS)
                         + f" | {r['best_epoch']} / {r['epochs_run']} | {r['train_s']:,.0f} |")
    means = {}
    for (dataset, label), recs in groups.items():
        if len(recs) < 2:
            means[(dataset, label)] = {m: recs[0]["test"][m] for m in METRICS}
            continue
        mean = {m: statistics.fmean(r["test"][m] for r in recs) for m in METRICS}
        means[(dataset, label)] = mean
        sd = statistics.stdev(r["test"]["ndcg@10"] for r in recs)
        lines.append(f"| {label} | {dataset} | mean of {len(recs)} | " + " | ".join(f"{mean[m]:.4f}" for m in METRICS)
                     + f" | sd NDCG@10 {sd:.4f} | |")
    for p in published:
        lines.append(f"| {p['method']} ({p['source']}) | {p['dataset']} | published | "
                     + " | ".join(f"{p[m]:.4f}" for m in METRICS) + " | | |")
    ratios = []
    for p in published:
        ours = means.get((p["dataset"], p["method"]))
        if ours is not None:
            ratios.append(f"| {p['method']} / {p['source']} | {p['dataset']} | ours / paper | "
                          + " | ".join(f"{ours[m] / p[m]:.2f}" for m in METRICS) + " | | |")
    return "\n".join(lines + ratios)


def render_folder(folder: str | Path) -> str:
    """The table of a results folder (its records and its ``published.json``, if any)."""
    folder = Path(folder)
    pub = folder / "published.json"
    published = json.loads(pub.read_text())["rows"] if pub.is_file() else []
    return render_table(read_records(folder), published)


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def readme_blocks(text: str) -> list[str]:
    """The names of the results blocks of a README."""
    return re.findall(r"<!-- results:([\w.-]+) -->", text)


def update_readme(text: str, results_root: str | Path) -> str:
    """``text`` with every results block replaced by the rendering of ``results_root/<name>``."""
    for name in readme_blocks(text):
        folder = Path(results_root) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"README block results:{name} has no folder {folder}")
        table = render_folder(folder)
        text = block_pattern(name).sub(lambda m: m.group(1) + table + "\n" + m.group(3), text)
    return text
