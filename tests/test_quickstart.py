"""`megarec quickstart` end to end on one embedded domain: SASRec, and UTGRec's transfer pipeline
(pre-trained on the two other sample domains). TIGER's pipeline, with its text encoder, is covered by
tests/test_train_rec_tiger_e2e.py."""
import json

import pytest

from megarec.cli import main


def test_quickstart_runs_stats_shards_and_a_recommender(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--methods", "sasrec,utgrec", "--domains", "Scientific",
                 "--profile", "tiny", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [s["domain"] for s in summary["stats"]] == ["Scientific"]
    assert summary["stats"][0]["users"] == 300
    # every item written is read back once through the shard reader, none bad
    assert summary["shards"]["items_read"] == summary["shards"]["items_written"] == summary["stats"][0]["items"]
    assert summary["shards"]["bad_samples"] == 0
    assert [(r["method"], r["dataset"]) for r in summary["results"]] == [("sasrec", "Scientific"),
                                                                         ("utgrec", "Scientific")]
    for row in summary["results"]:
        assert 0.0 <= row["ndcg@10"] <= row["recall@10"] <= 1.0
        assert f"| {row['method']} | Scientific |" in printed
    assert list((out / "Scientific" / "sasrec" / "rec" / "tb").iterdir())  # TensorBoard events written
    # UTGRec: tokenizer and T5 pre-trained on the two other sample domains, fine-tuned on Scientific
    from megarec.data.codes import CodesFile

    utg = out / "Scientific" / "utgrec"
    pre = CodesFile.load(utg / "tokenizer_pretrain" / "codes.safetensors")
    assert {k.split("/")[0] for k in pre.item_keys} == {"Office", "Games"}
    tgt = CodesFile.load(utg / "tokenizer_finetune" / "codes.safetensors")
    assert {k.split("/")[0] for k in tgt.item_keys} == {"Scientific"}
    assert (utg / "rec_pretrain" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (["--methods", "sasrec,foo"], "unknown method 'foo'; choose from sasrec, tiger, etegrec, unigrec, utgrec"),
    (["--methods", ","], "--methods: give at least one of sasrec"),
    (["--domains", "Office", "Toys"], "no sample domain ['Toys']; the sample has Scientific, Office, Games"),
    (["--methods", "sasrec,utgrec", "--profile", "huge"], "profile 'huge' has no settings for method 'sasrec'; "
                                                          "choose from paper, cpu-small, quickstart, tiny"),
])
def test_quickstart_checks_every_argument_before_any_work(tmp_path, capsys, args, message):
    """Nothing is computed or written (no statistics, no shards) before methods, domains and profile are known."""
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--no-progress", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "== 1/4" not in captured.out
    assert not out.exists()
