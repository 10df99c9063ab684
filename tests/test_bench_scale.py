"""tools/bench_scale.py runs end to end (seconds-long sizes): every catalogue stage timed and metered, the data
path's rate per worker beside a GPU's consumption."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_part(tmp_path: Path, part: str) -> tuple[dict, str]:
    """``bench_scale.py --tiny --parts PART``: that part's results and the printed output."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_scale.py"), "--tiny", "--parts", part,
                           "--json", str(out), "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())[part], proc.stdout


def test_catalogue_part_runs_every_stage(tmp_path):
    res, stdout = _run_part(tmp_path, "catalogue")
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
    assert "| read_5core |" in stdout


def test_data_part_measures_workers_and_the_gpu_rate(tmp_path):
    res, stdout = _run_part(tmp_path, "data")
    assert set(res["rates"]) == {"workers1", "workers2", "workers1_no_latent_cache"}
    for r in res["rates"].values():
        assert r["items_per_s"] > 0 and r["batches"] > 0
    assert res["rates"]["workers2"]["items_per_s_per_worker"] == res["rates"]["workers2"]["items_per_s"] / 2
    # a 224 px image is a 16 x 16 patch grid; FLOPs per item add up from the parameter counts
    assert res["per_item"]["vision_patches"] == 256.0
    f, c = res["flops_per_item"], res["params"]
    assert f["vision"] == 2 * c["vision"] * 256.0 and f["total"] == f["llm"] + f["vision"] + f["text_head"]
    assert res["gpu_items_per_s"] == round(res["assumed_mfu"] * res["peak_flops"] / f["total"], 1)
    assert res["workers_per_gpu_needed"] >= 1 and "one GPU consumes" in stdout
