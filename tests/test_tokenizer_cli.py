"""`megarec train-tokenizer` and `megarec tokenize` end to end on a tiny domain."""
import json

import numpy as np
import pytest
import torch

from megarec.cli import main
from megarec.data.codes import CodesFile
from megarec.data.embeddings import save_item_embeddings
from tests.tiny_models import WORDS, save_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def write_domain(folder, n_items=60, with_items=True, name="Tiny"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    inter = {f"u{u}": [int(i) for i in rng.choice(n_items, 6, replace=False)] for u in range(40)}
    for i in range(n_items):                        # every item appears at least once
        inter[f"u{i % 40}"].append(i)
    (folder / f"{name}.inter.json").write_text(json.dumps(inter))
    if with_items:
        items = {str(i): {"title": " ".join(rng.choice(WORDS, 4)), "brand": str(rng.choice(WORDS)),
                          "categories": "", "description": ""} for i in range(n_items)}
        (folder / f"{name}.item.json").write_text(json.dumps(items))
    return folder


SMALL = ["--epochs", "60", "--batch_size", "32", "--eval_every", "20", "--rqvae.hidden", "16",
         "--rqvae.code_dim", "4", "--rqvae.codebook_sizes", "8,8,16", "--rqvae.dead_code_steps", "10",
         "--kmeans_samples", "60"]


def test_train_tokenizer_then_tokenize(tmp_path, tiny_bert, capsys):
    data = write_domain(tmp_path / "Tiny")
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(data), "--out", str(out), *SMALL, "--encoder", str(tiny_bert)]) == 0
    printed = capsys.readouterr().out
    assert "collision rate" in printed and "| level |" in printed
    for name in ("model.safetensors", "config.yaml", "codes.safetensors", "stats.json",
                 "text_embeddings/Tiny.safetensors"):
        assert (out / name).is_file(), name
    codes = CodesFile.load(out / "codes.safetensors")
    assert codes.item_keys == [f"Tiny/{i}" for i in range(60)]
    assert codes.codebook_sizes == [8, 8, 16] and not codes.dedup_level
    assert codes.collision_rate() == 0.0 and codes.stats["collision_rate_after"] == 0.0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["policy"] == "utgrec" and stats["training"]["steps"] == 60 * 2
    assert stats["collision_rate_before"] > 0 and stats["resolution"]["moved"] > 0
    assert len(stats["levels"]) == 3 and 0 < stats["levels"][0]["usage"] <= 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    for tag in ("loss/total", "loss/recon", "loss/quant", "codebook/usage", "codebook/perplexity",
                "codebook/collision_rate"):
        assert tag in tags

    dedup = tmp_path / "dedup.safetensors"
    assert main(["tokenize", str(data), "--model", str(out), "--out", str(dedup), "--collisions", "dedup"]) == 0
    d = CodesFile.load(dedup)
    assert d.dedup_level and len(d.codebook_sizes) == 4 and d.collision_rate() == 0.0
    assert d.item_keys == codes.item_keys
    # same model, same items: the semantic levels agree wherever utgrec did not move a last code
    assert np.array_equal(d.codes[:, :2], codes.codes[:, :2])


def test_collaborative_embeddings_input_and_errors(tmp_path, capsys):
    data = write_domain(tmp_path / "Tiny", with_items=False)
    emb = tmp_path / "sasrec.safetensors"
    save_item_embeddings(emb, torch.randn(60, 8, generator=torch.Generator().manual_seed(0)),
                         [f"Tiny/{i}" for i in range(60)], source="test")
    # no item text: text input is refused with a clear message
    assert main(["train-tokenizer", str(data), "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert "needs item text" in capsys.readouterr().err
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(data), "--out", str(out), "--embeddings", str(emb), *SMALL,
                 "--collisions", "dedup"]) == 0
    assert CodesFile.load(out / "codes.safetensors").dedup_level
    assert not (out / "text_embeddings").exists()
    assert main(["tokenize", str(data), "--model", str(out), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "--embeddings" in capsys.readouterr().err
    assert main(["tokenize", str(data), "--model", str(out), "--out", str(tmp_path / "c.safetensors"),
                 "--embeddings", str(emb), "--collisions", "none"]) == 0
    # bad overrides and a bad model folder are clear errors too
    assert main(["train-tokenizer", str(data), "--out", str(out), "--rqvae.nope", "1"]) == 2
    assert "unknown key 'rqvae.nope'" in capsys.readouterr().err
    assert main(["tokenize", str(data), "--model", str(tmp_path), "--out", str(tmp_path / "c2")]) == 2
    assert "not a trained tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stats", str(data), "--epochs", "3"])          # overrides only where a command takes them


def test_two_paths_train_one_tokenizer_and_write_one_codes_file(tmp_path, tiny_bert, capsys):
    # Pens is Tiny under another name: the same item texts, so a tokenizer gives both domains the same codes
    tiny, pens = write_domain(tmp_path / "Tiny"), write_domain(tmp_path / "Pens", n_items=60, name="Pens")
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(tiny), str(pens), "--out", str(out), *SMALL, "--encoder", str(tiny_bert)]) == 0
    assert "2 domains in one code space (Tiny: 60 items, Pens: 60 items)" in capsys.readouterr().out
    codes = CodesFile.load(out / "codes.safetensors")
    assert codes.item_keys == [f"Tiny/{i}" for i in range(60)] + [f"Pens/{i}" for i in range(60)]
    assert codes.collision_rate() == 0.0
    assert codes.stats["cross_domain_collision_rate_before"] == 1.0      # every item had its twin's ID
    assert [d["name"] for d in codes.stats["settings"]["domains"]] == ["Tiny", "Pens"]
    for name in ("Tiny", "Pens"):
        assert (out / "text_embeddings" / f"{name}.safetensors").is_file()

    # tokenize: one file for both domains (dedup), collisions resolved across them
    both = tmp_path / "both.safetensors"
    assert main(["tokenize", str(tiny), str(pens), "--model", str(out), "--out", str(both),
                 "--collisions", "dedup"]) == 0
    assert "2 domains in one code space" in capsys.readouterr().out
    d = CodesFile.load(both)
    assert d.item_keys == codes.item_keys and d.dedup_level and d.collision_rate() == 0.0
    # (one domain at a time, the two files would collide everywhere and merge_codes refuses them:
    # tests/test_codes_multidomain.py); the same domain twice is a clear error
    assert main(["tokenize", str(tiny), str(tiny), "--model", str(out), "--out", str(both)]) == 2
    assert "domain names must be unique" in capsys.readouterr().err
