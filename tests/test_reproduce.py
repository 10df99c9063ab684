"""tools/reproduce.py: the results table and its JSON, and methods that cannot run on a dataset."""
from __future__ import annotations

import json
import shutil

from megarec.data.sample import SAMPLE_DIR
from tests.tools import load_tool


def test_a_method_that_needs_text_is_skipped_on_a_domain_without_and_the_rest_runs(tmp_path, capsys):
    """As Instruments in the issue: TIGER needs item text, the domain has none; it is reported (stdout and JSON
    ``skipped``, once for all seeds) and SASRec still runs on every seed."""
    folder = tmp_path / "NoText"
    folder.mkdir()
    shutil.copy(SAMPLE_DIR / "Scientific" / "Scientific.inter.json", folder / "NoText.inter.json")
    js = tmp_path / "r.json"
    assert load_tool("reproduce").main(["--data", str(folder), "--methods", "tiger,sasrec", "--profile", "tiny",
                              "--seeds", "2024,2025", "--out", str(tmp_path / "runs"), "--json", str(js),
                              "--no_progress"]) == 0
    out = json.loads(js.read_text())
    assert [(r["method"], r["seed"]) for r in out["results"]] == [("sasrec", 2024), ("sasrec", 2025)]
    (sk,) = out["skipped"]
    assert sk["method"] == "tiger" and sk["dataset"] == "NoText" and "needs item text" in sk["reason"]
    assert [r["method"] for r in out["table"] if r["seed"] == "mean"] == ["sasrec"]
    assert "skipped: tiger on NoText" in capsys.readouterr().out
