"""Every command checks its arguments before any work starts: a bad one is exit code 2 with a message naming
it, and nothing is written (`megarec train-rec`, `train-tokenizer`, `tokenize`, `recommend`; quickstart and
tools/reproduce.py: tests/test_quickstart.py, tests/test_reproduce.py)."""
from __future__ import annotations

import pytest
import torch

from megarec.cli import main
from megarec.data.embeddings import save_item_embeddings
from megarec.data.sample import SAMPLE_DIR
from tests.test_tokenizer_cli import SMALL, write_domain

SCIENTIFIC = str(SAMPLE_DIR / "Scientific")


# --------------------------------------------------------------------------- train-rec
@pytest.mark.parametrize("flag,value,message", [
    ("--deepspeed", "missing.json", "train.deepspeed: DeepSpeed config"),
    ("--init_from", "no_such_run", "train.init_from: no_such_run: no model.safetensors"),
])
def test_train_rec_checks_its_files_before_reading_data(tmp_path, capsys, flag, value, message):
    """TIGER without data.codes would fail in its data preparation; the file given is named first."""
    run = tmp_path / "run"
    assert main(["train-rec", "--method", "tiger", "--profile", "tiny", "--data.paths", SCIENTIFIC,
                 "--train.run_dir", str(run), flag, str(tmp_path / value)]) == 2
    assert message.replace(value, str(tmp_path / value)) in capsys.readouterr().err
    assert not run.exists()


def test_train_rec_with_the_launcher_checks_the_config_before_starting_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-rec", "--launcher", "deepspeed", "--num_gpus", "2", "--method", "sasrec", "--profile", "tiny",
                 "--data.paths", SCIENTIFIC, "--train.run_dir", str(run), "--train.nonsense", "1"]) == 2
    assert "unknown key 'train.nonsense'" in capsys.readouterr().err   # from this process: no rank started
    assert not run.exists()


# --------------------------------------------------------------------------- train-tokenizer / tokenize
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """An RQ-VAE trained on random item embeddings of a 60-item domain (seconds)."""
    root = tmp_path_factory.mktemp("tok")
    data = write_domain(root / "Tiny", with_items=False)
    emb = root / "emb.safetensors"
    save_item_embeddings(emb, torch.randn(60, 8, generator=torch.Generator().manual_seed(0)),
                         [f"Tiny/{i}" for i in range(60)], source="test")
    assert main(["train-tokenizer", str(data), "--out", str(root / "model"), "--embeddings", str(emb), *SMALL]) == 0
    return {"data": data, "emb": emb, "model": root / "model"}


def test_train_tokenizer_with_a_missing_embeddings_file_writes_nothing(tokenizer, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(tokenizer["data"]), "--out", str(out), "--embeddings",
                 str(tmp_path / "none.safetensors"), *SMALL]) == 2
    assert f"embeddings file {tmp_path / 'none.safetensors'} does not exist" in capsys.readouterr().err
    assert not out.exists()
    # an existing tokenizer folder keeps its codes
    assert main(["train-tokenizer", str(tokenizer["data"]), "--out", str(tokenizer["model"]), "--embeddings",
                 str(tmp_path / "none.safetensors"), *SMALL]) == 2
    assert (tokenizer["model"] / "codes.safetensors").is_file()


def test_train_tokenizer_with_a_missing_text_encoder_writes_nothing(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["train-tokenizer", SCIENTIFIC, "--out", str(out), "--encoder", str(tmp_path / "no_encoder"),
                 *SMALL]) == 2
    assert f"text encoder {tmp_path / 'no_encoder'} does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_utgrec_tokenizer_checks_init_from_before_building_the_encoder(tmp_path, capsys):
    """The shard folder does not exist either: the weights are named before any data or model is read."""
    run = tmp_path / "run"
    assert main(["train-tokenizer", "--method", "utgrec", str(tmp_path / "shards"), "--out", str(run),
                 "--init_from", str(tmp_path / "pretrained")]) == 2
    assert f"train.init_from: {tmp_path / 'pretrained'}: no model.safetensors" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("case", ["no_model", "out_is_a_folder", "missing_embeddings"])
def test_tokenize_checks_its_arguments_before_any_work(tokenizer, tmp_path, capsys, case):
    out = tmp_path / "codes" / "c.safetensors"
    model, emb = str(tokenizer["model"]), str(tokenizer["emb"])
    if case == "no_model":
        model, message = str(tmp_path / "nothing"), "not a trained tokenizer"
    elif case == "out_is_a_folder":
        out.mkdir(parents=True)
        message = "is a folder"
    else:
        emb, message = str(tmp_path / "none.safetensors"), "does not exist"
    assert main(["tokenize", str(tokenizer["data"]), "--model", model, "--out", str(out),
                 "--embeddings", emb]) == 2
    assert message in capsys.readouterr().err
    written = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*"))
    assert written == (["codes", "codes/c.safetensors"] if case == "out_is_a_folder" else []), written


# --------------------------------------------------------------------------- recommend
@pytest.mark.parametrize("extra,message", [
    (["--histories", "missing.jsonl"], "missing.jsonl does not exist"),
    (["--user", "u0", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--user", "u0", "--topk", "0"], "--topk must be >= 1"),
])
def test_recommend_checks_its_arguments_before_loading_the_model(tmp_path, capsys, extra, message):
    """The model folder does not exist either: the argument is named before the model is looked at."""
    extra = [str(tmp_path / e) if e.endswith(".jsonl") else e for e in extra]
    assert main(["recommend", "--model", str(tmp_path / "no_model"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "not a trained model" not in err
