"""tools/reproduce.py: the results table and its JSON, methods that cannot run on a dataset, --resume, and
flags that contradict each other."""
from __future__ import annotations

import json
import shutil

import pytest

from megarec.config import ConfigError
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


def test_resume_continues_a_stopped_run_exactly(tmp_path):
    """A run stopped after its first epoch (the newest checkpoint removed, as a kill would leave it): a rerun
    refuses without --resume (nothing overwritten), and with --resume continues to the uninterrupted result."""
    data = str(SAMPLE_DIR / "Scientific")
    repro = load_tool("reproduce").main

    def run(*extra):
        js = tmp_path / "r.json"
        assert repro(["--data", data, "--methods", "sasrec", "--profile", "tiny", "--out", str(tmp_path / "runs"),
                      "--json", str(js), "--no_progress", "--cpu_threads", "1", "--set", "train.epochs", "2",
                      "--set", "train.patience", "0", *extra]) == 0
        return json.loads(js.read_text())["results"][0]

    straight = run()
    rec = tmp_path / "runs" / "tiny" / "Scientific" / "sasrec" / "seed2024" / "rec"
    ckpt = rec / "checkpoints"
    first, last = sorted((p.name for p in ckpt.iterdir() if p.name.startswith("step")), key=lambda n: int(n[4:]))
    shutil.rmtree(ckpt / last)
    (ckpt / "latest").write_text(first)
    (rec / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run()
    assert (ckpt / first).is_dir()
    resumed = run("--resume")
    assert json.loads((rec / "metrics.json").read_text())["resumed_from_step"] == int(first[4:])   # continued
    assert resumed["epochs_run"] == straight["epochs_run"] == 2
    for k in ("recall@10", "ndcg@10", "recall@5", "ndcg@5"):
        assert resumed[k] == straight[k], k


def test_pretrain_seed_and_pretrain_per_seed_contradict(capsys):
    with pytest.raises(SystemExit):
        load_tool("reproduce").main(["--data", str(SAMPLE_DIR / "Scientific"), "--pretrain_seed", "7",
                                     "--pretrain_per_seed"])
    assert "--pretrain_seed names the seed of one shared pre-training" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--data", "{Scientific}", "{tmp}/Missing"], "--data {tmp}/Missing: {tmp}/Missing: no such file or folder"),
    (["--data", "{Scientific}", "{Scientific}"], "--data: domain 'Scientific' is given twice"),
    (["--data", "{Scientific}", "--pretrain", "{Office}", "{tmp}/Missing"], "--pretrain {tmp}/Missing:"),
    (["--data", "{Scientific}", "--methods", "sasrec,foo"], "--methods: unknown method 'foo'; choose from sasrec, "
                                                            "tiger, etegrec, unigrec, utgrec, utgrec-nopt"),
    (["--data", "{Scientific}", "--profile", "huge"], "--profile: profile 'huge' has no settings for method"),
    (["--data", "{Scientific}", "--seeds", "2024,x"], "--seeds: expected comma-separated integers"),
    (["--data", "{Scientific}", "--seeds", ","], "--seeds: expected comma-separated integers"),
    (["--data", "{Scientific}", "--set", "train.nonsense", "1"], "unknown key 'train.nonsense'"),
    (["--data", "{Scientific}", "--deepspeed", "{tmp}/ds.json"], "train.deepspeed: DeepSpeed config {tmp}/ds.json"),
    (["--data", "{Scientific}", "--json", "{tmp}/no/r.json"], "--json {tmp}/no/r.json: folder {tmp}/no does not"),
])
def test_every_argument_is_checked_before_the_first_training(tmp_path, capsys, args, message):
    """A bad argument anywhere (here after a good dataset and method) stops the script with exit code 2 before
    anything is trained or written."""
    fill = {"Scientific": SAMPLE_DIR / "Scientific", "Office": SAMPLE_DIR / "Office", "tmp": tmp_path}
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:   # the last --profile wins
        load_tool("reproduce").main(["--profile", "tiny", "--out", str(out), "--no_progress",
                                     *[a.format(**fill) for a in args]])
    assert e.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert not out.exists()
