"""tools/bench_scale.py runs end to end (seconds-long sizes): every catalogue stage timed and metered."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_catalogue_part_runs_every_stage(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_scale.py"), "--tiny", "--parts", "catalogue",
                           "--json", str(out), "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["catalogue"]
    stages = ("generate", "read_5core", "split", "embeddings", "rqvae", "assign_dedup", "assign_utgrec",
              "code_sequences", "trie", "t5_train", "beam_eval", "full_rank_eval")
    for name in stages:
        assert res[name]["s"] >= 0 and 0 < res[name]["gb"] < 8, (name, res[name])
    # 5-core removed the noise users / items and kept the core (every core user and item has >= 5)
    assert res["read_5core"]["users"] == 3000 and res["read_5core"]["items"] == 1000
    assert res["generate"]["raw_users"] > 3000 and res["generate"]["raw_items"] > 1000
    assert res["split"]["test"] == 3000 and res["catalogue"]["interactions"] == res["read_5core"]["interactions"]
    assert res["assign_utgrec"]["collisions_after"] == 0.0   # resolved, not an error
    assert 0.0 <= res["beam_eval"]["ndcg@10"] <= 1.0 and res["t5_train"]["s_per_step_median"] > 0
    assert "| read_5core |" in proc.stdout
