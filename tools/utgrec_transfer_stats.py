"""Where UTGRec's transfer is kept or lost: code statistics of one pipeline folder (issue 18, step 1).

    python tools/utgrec_transfer_stats.py RUN/Office/utgrec [--json stats.json]

For the pre-training and the target's codes (``tokenizer_pretrain/`` and ``tokenizer_finetune/``
``codes.safetensors``; the tokenizer run of ``utgrec-nopt`` is ``tokenizer/``): per level, the codes used,
their perplexity, and for the target the **share of its items whose code at that level is a row the T5
pre-training saw** (a (level, code) pair some pre-training item has: the T5's embedding of every other row
is untrained); the share of items whose full prefix up to a level was seen; collisions before resolution
(from each stage's ``metrics.json``); then every recommender stage's validation history and test metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("tokenizer_pretrain", "tokenizer_finetune", "tokenizer")


def read_codes(folder: Path) -> list[tuple[int, ...]] | None:
    """The codes of ``folder/codes.safetensors`` (one tuple per item), or ``None`` when absent."""
    from megarec.data.codes import CodesFile

    path = folder / "codes.safetensors"
    if not path.is_file():
        return None
    return [tuple(row) for row in CodesFile.load(path).codes.tolist()]


def perplexity(values: list[int]) -> float:
    n = len(values)
    return math.exp(-sum(c / n * math.log(c / n) for c in Counter(values).values())) if n else 0.0


def level_stats(codes: list[tuple[int, ...]], seen: list[tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """Per level: codes used and perplexity; with ``seen`` (the pre-training's codes), the share of items on a
    row the pre-training used and the share whose prefix up to this level a pre-training item shares."""
    out = []
    for level in range(len(codes[0])):
        col = [c[level] for c in codes]
        row = {"level": level + 1, "used": len(set(col)), "perplexity": round(perplexity(col), 2)}
        if seen is not None:
            rows = {c[level] for c in seen}
            prefixes = {c[: level + 1] for c in seen}
            row["on_pretrained_rows"] = round(sum(v in rows for v in col) / len(col), 4)
            row["prefix_seen"] = round(sum(c[: level + 1] in prefixes for c in codes) / len(codes), 4)
        out.append(row)
    return out


def summarise(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": str(run)}
    pre = read_codes(run / "tokenizer_pretrain")
    for stage in STAGES:
        codes = read_codes(run / stage)
        if codes is None:
            continue
        m = json.loads((run / stage / "metrics.json").read_text()) if (run / stage / "metrics.json").is_file() else {}
        c = m.get("codes", {})
        out[stage] = {"items": len(codes), "collision_rate_before": c.get("collision_rate_before"),
                      "heldout_collision_rate": m.get("heldout_collision_rate"),
                      "levels": level_stats(codes, pre if stage != "tokenizer_pretrain" else None)}
    for stage in ("rec_pretrain", "rec"):
        path = run / stage / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            out[stage] = {"best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run"),
                          "valid_ndcg@10": [(h["epoch"], round(h.get("ndcg@10", float("nan")), 4))
                                            for h in m.get("valid_history", [])],
                          "test": {k: round(v, 4) for k, v in (m.get("test") or {}).items()
                                   if k in ("recall@10", "ndcg@10")}}
    return out


def table(s: dict[str, Any]) -> str:
    rows = ["| stage | items | collisions before | level | used | perplexity | on pre-trained rows | prefix seen |",
            "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        if stage not in s:
            continue
        st = s[stage]
        for lv in st["levels"]:
            cb = st["collision_rate_before"]
            rows.append(f"| {stage} | {st['items']} | {'-' if cb is None else f'{cb:.3f}'} | {lv['level']} | "
                        f"{lv['used']} | {lv['perplexity']:.1f} | {lv.get('on_pretrained_rows', '-')} | "
                        f"{lv.get('prefix_seen', '-')} |")
    for stage in ("rec_pretrain", "rec"):
        if stage in s:
            r = s[stage]
            rows.append(f"\n{stage}: best epoch {r['best_epoch']} of {r['epochs_run']}; validation NDCG@10 "
                        + ", ".join(f"{e}: {v}" for e, v in r["valid_ndcg@10"]) + f"; test {r['test']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a UTGRec pipeline folder (RUN/<target>/utgrec)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    s = summarise(a.run)
    print(table(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return s


if __name__ == "__main__":
    main()
