"""TIGER end to end on a tiny domain: item text -> RQ-VAE codes -> T5 -> beam search -> metrics,
through ``megarec.methods.training.run_pipeline`` (what quickstart and tools/reproduce.py call)."""
from __future__ import annotations

import json

import pytest

from megarec.data.codes import CodesFile
from tests.test_train_rec import write_domain


@pytest.mark.slow
def test_tiger_pipeline_on_a_tiny_domain(tmp_path):
    from megarec.methods.training import run_pipeline

    a = write_domain(tmp_path, "Tiny", 30, 16, seed=4)
    out = tmp_path / "tiger"
    result = run_pipeline("tiger", [a], out, profile="tiny", progress=False,
                          overrides=[("train.epochs", "1")])
    codes_path = out / "tokenizer" / "codes.safetensors"
    codes = CodesFile.load(codes_path)
    assert codes.item_keys == [f"Tiny/{i}" for i in range(16)]
    assert codes.dedup_level and codes.collision_rate() == 0.0           # TIGER's extra token
    assert result["tokenizer"]["collision_rate_after"] == 0.0
    m = json.loads((out / "rec" / "metrics.json").read_text())
    assert m == {k: v for k, v in result.items() if k != "tokenizer"}
    assert m["epochs_run"] == 1 and m["test"]["count"] == 30
    assert {"recall@5", "recall@10", "ndcg@5", "ndcg@10"} <= set(m["test"])
    assert 0 <= m["test"]["ndcg@10"] <= m["test"]["recall@10"] <= 1
    # the run folder is self-contained for `megarec recommend`
    assert CodesFile.load(out / "rec" / "model" / "codes.safetensors").item_keys == codes.item_keys
    # a second call with the same tokenizer settings reuses the codes file ...
    before = codes_path.stat().st_mtime_ns
    again = run_pipeline("tiger", [a], tmp_path / "tiger", profile="tiny", progress=False,
                         overrides=[("train.epochs", "0"), ("train.run_dir", str(tmp_path / "again"))])
    assert codes_path.stat().st_mtime_ns == before and again["tokenizer"] == result["tokenizer"]
    # ... other settings retrain it (the tokenizer seed follows the run's seed)
    run_pipeline("tiger", [a], tmp_path / "tiger", profile="tiny", progress=False,
                 overrides=[("train.epochs", "0"), ("train.seed", "7"), ("train.run_dir", str(tmp_path / "seed7"))])
    assert codes_path.stat().st_mtime_ns != before


def test_sasrec_pipeline_needs_no_codes(tmp_path):
    from megarec.methods.training import run_pipeline

    a = write_domain(tmp_path, "Tiny", 30, 16, seed=4)
    result = run_pipeline("sasrec", [a], tmp_path / "sas", profile="tiny", progress=False,
                          overrides=[("train.epochs", "1")])
    assert "tokenizer" not in result and not (tmp_path / "sas" / "tokenizer").exists()
    cfg = (tmp_path / "sas" / "rec" / "config.yaml").read_text()
    assert "method: sasrec" in cfg and result["test"]["count"] == 30
