"""tools/utgrec_transfer_stats.py: per-level code statistics against the pre-training's rows, from real files."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from megarec.data.codes import CodesFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import utgrec_transfer_stats as uts  # noqa: E402


def _codes(folder: Path, rows: list[list[int]], collisions: float) -> None:
    folder.mkdir(parents=True)
    CodesFile([f"D/{i}" for i in range(len(rows))], np.array(rows), [4, 16]).save(folder / "codes.safetensors")
    (folder / "metrics.json").write_text(json.dumps({"codes": {"collision_rate_before": collisions}}))


def test_shares_on_pretrained_rows_and_prefixes(tmp_path, capsys):
    _codes(tmp_path / "tokenizer_pretrain", [[0, 5], [0, 6], [1, 5]], 0.1)
    # target: root 0 seen (2 items), root 3 unseen; level 2: 5 seen, 6 seen, 9 not; prefix (0, 6) seen, (3, 5) not
    _codes(tmp_path / "tokenizer_finetune", [[0, 6], [0, 9], [3, 5], [3, 5]], 0.5)
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "metrics.json").write_text(json.dumps(
        {"best_epoch": 3, "epochs_run": 6, "valid_history": [{"epoch": 3, "ndcg@10": 0.05}], "test": {"ndcg@10": 0.04}}))
    s = uts.main([str(tmp_path)])
    t = s["tokenizer_finetune"]
    assert t["items"] == 4 and t["collision_rate_before"] == 0.5
    l1, l2 = t["levels"]
    assert l1["used"] == 2 and l1["on_pretrained_rows"] == 0.5 and l1["prefix_seen"] == 0.5
    assert l2["on_pretrained_rows"] == 0.75 and l2["prefix_seen"] == 0.25
    assert math.isclose(l1["perplexity"], 2.0) and "on_pretrained_rows" not in s["tokenizer_pretrain"]["levels"][0]
    assert s["rec"]["best_epoch"] == 3 and [tuple(x) for x in s["rec"]["valid_ndcg@10"]] == [(3, 0.05)]
    assert "| tokenizer_finetune | 4 | 0.500 | 2 |" in capsys.readouterr().out
