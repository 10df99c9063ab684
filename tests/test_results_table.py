"""Results as data: tools/reproduce.py writes one record per run, tools/results_table.py renders the README's
results tables from the records under docs/results/, and the README equals that rendering."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megarec.data.sample import SAMPLE_DIR
from megarec.results import read_records, render_table, update_readme
from tests.tools import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_equal_the_rendered_records():
    """Every results block of the README is exactly the rendering of its docs/results/<name>/ folder."""
    assert load_tool("results_table").main(["--check", str(ROOT / "README.md")]) == 0


def record(method: str, seed: int, ndcg10: float, dataset: str = "D") -> dict:
    return {"format": "megarec-run/1", "method": method, "dataset": dataset, "seed": seed, "best_epoch": 3,
            "epochs_run": 9, "train_s": 12.0,
            "test": {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": ndcg10, "count": 10}}


def test_render_means_sd_published_rows_and_ratios():
    rows = [record("tiger", 2025, 0.03), record("tiger", 2024, 0.05), record("sasrec", 2024, 0.02)]
    published = [{"source": "P", "method": "TIGER", "dataset": "D", "recall@5": 0.1, "recall@10": 0.4,
                  "ndcg@5": 0.1, "ndcg@10": 0.08}]
    lines = render_table(rows, published).splitlines()
    assert lines[2].startswith("| TIGER | D | 2024 | 0.1000 | 0.2000 | 0.0500 | 0.0500 | 3 / 9 | 12 |")
    assert lines[3].startswith("| TIGER | D | 2025 |")     # seeds in order
    assert "| TIGER | D | mean of 2 | 0.1000 | 0.2000 | 0.0500 | 0.0400 | sd NDCG@10 0.0141 | |" in lines
    assert not any("SASRec | D | mean" in ln for ln in lines)   # one seed: no mean row
    assert "| TIGER (P) | D | published | 0.1000 | 0.4000 | 0.1000 | 0.0800 | | |" in lines
    assert lines[-1] == "| TIGER / P | D | ours / paper | 1.00 | 0.50 | 0.50 | 0.50 | | |"


def test_update_readme_replaces_only_its_blocks(tmp_path):
    folder = tmp_path / "t1" / "D" / "tiger"
    folder.mkdir(parents=True)
    (folder / "seed1.json").write_text(json.dumps(record("tiger", 1, 0.04)))
    text = "intro\n<!-- results:t1 -->\nold table\n<!-- /results:t1 -->\nafter\n"
    new = update_readme(text, tmp_path)
    assert new.startswith("intro\n<!-- results:t1 -->\n| method |") and new.endswith("<!-- /results:t1 -->\nafter\n")
    assert "old table" not in new and update_readme(new, tmp_path) == new
    with pytest.raises(FileNotFoundError, match="results:t2"):
        update_readme("<!-- results:t2 -->\nx\n<!-- /results:t2 -->", tmp_path)
    (folder / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a run record"):
        read_records(tmp_path / "t1")


def test_reproduce_writes_a_record_per_run(tmp_path):
    """A tiny SASRec run: its record holds the config, the commit, the test metrics, the validation history
    and the best epoch, and renders."""
    out = tmp_path / "results"
    assert load_tool("reproduce").main(["--data", str(SAMPLE_DIR / "Office"), "--methods", "sasrec", "--profile",
                                        "tiny", "--seeds", "7", "--out", str(tmp_path / "runs"), "--no_progress",
                                        "--results", str(out), "--variant", "smoke"]) == 0
    (rec,) = read_records(out)
    assert (rec["method"], rec["dataset"], rec["seed"], rec["variant"]) == ("sasrec", "Office", 7, "smoke")
    assert rec["config"]["method"] == "sasrec" and rec["config"]["train"]["seed"] == 7
    assert len(rec["commit"]) == 40 and rec["valid_history"] and rec["epochs_run"] >= rec["best_epoch"] + 1
    metrics = json.loads((tmp_path / "runs" / "tiny" / "Office" / "sasrec" / "seed7" / "rec" / "metrics.json")
                         .read_text())
    assert rec["test"]["ndcg@10"] == metrics["test"]["ndcg@10"] and rec["best_epoch"] == metrics["best_epoch"]
    assert "SASRec (smoke) | Office | 7 |" in render_table([rec])
