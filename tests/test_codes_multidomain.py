"""One code space across domains: one tokenizer on several domains, unique IDs over the merged
catalogue, and reuse of a codes file only when the settings that made it are the same."""
import logging

import numpy as np
import pytest
import torch

from megarec.config import TokenizerConfig, load_config
from megarec.data.code_sequences import merge_codes
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain
from megarec.data.embeddings import save_item_embeddings
from megarec.tokenizer import commands
from megarec.tokenizer.commands import (codes_for, codes_settings, codes_settings_fingerprint, reusable_codes,
                                        settings_diff, tokenize, train_tokenizer)

SMALL = [("epochs", "15"), ("batch_size", "32"), ("eval_every", "15"), ("rqvae.hidden", "16"),
         ("rqvae.code_dim", "4"), ("rqvae.codebook_sizes", "8,8,16"), ("rqvae.dead_code_steps", "0"),
         ("kmeans_samples", "64"), ("device", "cpu")]


def small_cfg(*extra: tuple[str, str]) -> TokenizerConfig:
    return load_config(TokenizerConfig, None, SMALL + list(extra))


def domain(name: str, n_items: int) -> Domain:
    return Domain(name, [str(i) for i in range(n_items)], ["u0"], [np.arange(n_items, dtype=np.int64)])


@pytest.fixture()
def two_domains(tmp_path):
    """Domains A (30 items) and B (24 items); B's first 10 items have exactly A's first 10 inputs, so a
    tokenizer codes them alike: tokenized one domain at a time, their IDs collide across domains."""
    a, b = domain("A", 30), domain("B", 24)
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(30, 8, generator=g)
    xb = torch.cat([xa[:10], torch.randn(14, 8, generator=g)])
    emb = tmp_path / "emb.safetensors"
    save_item_embeddings(emb, torch.cat([xa, xb]), [f"A/{i}" for i in range(30)] + [f"B/{i}" for i in range(24)],
                         source="test")
    return a, b, emb


@pytest.fixture()
def train_calls(monkeypatch):
    """Counts RQ-VAE trainings."""
    calls = []
    real = commands.train_rqvae

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(commands, "train_rqvae", counting)
    return calls


@pytest.fixture()
def log_lines():
    """Messages of the megarec logger (it does not propagate to the root logger, so caplog misses them)."""
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = ListHandler()
    logger = logging.getLogger("megarec")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.mark.parametrize("policy", ["utgrec", "dedup"])
def test_domains_tokenized_together_get_distinct_ids(tmp_path, two_domains, policy):
    a, b, emb = two_domains
    out = tmp_path / "tok"
    stats = train_tokenizer([a, b], small_cfg(("collisions", policy)), out, embeddings=emb, progress=False)
    codes = CodesFile.load(out / "codes.safetensors")
    assert codes.item_keys == [f"A/{i}" for i in range(30)] + [f"B/{i}" for i in range(24)]
    assert codes.collision_rate() == 0.0 and codes.shared_ids() == []
    assert stats["domains"] == {"A": 30, "B": 24} and stats["num_items"] == 54
    assert stats["cross_domain_collision_rate_before"] >= 20 / 54        # the ten shared items, both copies

    # the same tokenizer, one domain at a time: each file is clean, but their IDs collide across them ...
    sep = [tokenize(out, d, tmp_path / f"{d.name}.safetensors", embeddings=emb) for d in (a, b)]
    assert all(f.collision_rate() == 0.0 for f in sep)
    naive = CodesFile(sep[0].item_keys + sep[1].item_keys, np.concatenate([f.codes for f in sep]),
                      sep[1].codebook_sizes)
    assert naive.collision_rate() >= 20 / 54
    with pytest.raises(DataError, match="tokenize the domains together"):   # ... so merging them is refused
        merge_codes(sep, names=["A.safetensors", "B.safetensors"])
    # ... while `tokenize` of both domains at once resolves collisions over the merged catalogue
    joint = tokenize(out, [a, b], tmp_path / "AB.safetensors", embeddings=emb)
    assert joint.item_keys == codes.item_keys and joint.collision_rate() == 0.0
    assert joint.stats["domains"] == {"A": 30, "B": 24}


def test_repeated_domain_names_are_refused(tmp_path, two_domains):
    a, _, emb = two_domains
    with pytest.raises(DataError, match="domain names must be unique"):
        train_tokenizer([a, a], small_cfg(), tmp_path / "tok", embeddings=emb, progress=False)
    with pytest.raises(DataError, match="no domains"):
        codes_for([], small_cfg(), tmp_path / "tok", embeddings=emb)


def test_codes_for_reuses_only_with_the_same_settings(tmp_path, two_domains, train_calls, log_lines):
    a, b, emb = two_domains
    out = tmp_path / "tok"
    path, stats = codes_for([a, b], small_cfg(), out, embeddings=emb, progress=False)
    assert path == out / "codes.safetensors" and len(train_calls) == 1
    assert stats["settings"] == codes_settings(small_cfg(), [a, b], emb)
    assert stats["settings_fingerprint"] == codes_settings_fingerprint(small_cfg(), [a, b], emb)

    again, stats2 = codes_for([a, b], small_cfg(("device", "auto")), out, embeddings=emb, progress=False)
    assert again == path and len(train_calls) == 1 and stats2 == stats     # same settings: reused
    assert any("reusing" in m for m in log_lines)

    codes_for([a, b], small_cfg(("epochs", "16")), out, embeddings=emb, progress=False)    # one setting changed
    assert len(train_calls) == 2
    assert any("settings changed" in m and "tokenizer.epochs: 15 -> 16" in m for m in log_lines)
    assert CodesFile.load(path).stats["settings"]["tokenizer"]["epochs"] == 16

    codes_for([a], small_cfg(("epochs", "16")), out, embeddings=emb, progress=False)      # other domains
    assert len(train_calls) == 3 and CodesFile.load(path).item_keys == [f"A/{i}" for i in range(30)]

    torch.manual_seed(1)                                                                 # other embeddings
    save_item_embeddings(emb, torch.randn(54, 8), [f"A/{i}" for i in range(30)] + [f"B/{i}" for i in range(24)],
                         source="test")
    codes_for([a], small_cfg(("epochs", "16")), out, embeddings=emb, progress=False)
    assert len(train_calls) == 4
    codes_for([a], small_cfg(("epochs", "16")), out, embeddings=emb, progress=False)
    assert len(train_calls) == 4


def test_codes_without_settings_or_unreadable_are_not_reused(tmp_path, two_domains, train_calls, log_lines):
    a, b, emb = two_domains
    out = tmp_path / "tok"
    settings = codes_settings(small_cfg(), [a, b], emb)
    assert reusable_codes(out, settings) is None                              # nothing there yet
    keys = [f"A/{i}" for i in range(30)] + [f"B/{i}" for i in range(24)]
    CodesFile(keys, np.zeros((54, 1), dtype=np.int64), [1]).save(out / "codes.safetensors")   # an old-style file
    assert reusable_codes(out, settings) is None
    assert any("records no tokenizer settings" in m for m in log_lines)
    (out / "codes.safetensors").write_bytes(b"garbage")
    assert reusable_codes(out, settings) is None
    assert any("not a MegaRec codes file" in m for m in log_lines)
    codes_for([a, b], small_cfg(), out, embeddings=emb, progress=False)
    assert len(train_calls) == 1 and CodesFile.load(out / "codes.safetensors").collision_rate() == 0.0


def test_settings_cover_text_item_ids_and_input_kind():
    texts = [{"title": "red lamp"}, {"title": "blue box"}]
    d = Domain("A", ["0", "1"], ["u0"], [np.array([0, 1])], item_text=texts)
    base = codes_settings(TokenizerConfig(), d)
    assert base["input"] == "text" and base["domains"][0]["items"] == 2
    assert "device" not in base["tokenizer"]
    edited = Domain("A", ["0", "1"], ["u0"], [np.array([0, 1])], item_text=[texts[0], {"title": "blue tin"}])
    renamed = Domain("A", ["0", "9"], ["u0"], [np.array([0, 1])], item_text=texts)
    assert codes_settings_fingerprint(TokenizerConfig(), edited) != codes_settings_fingerprint(TokenizerConfig(), d)
    assert codes_settings_fingerprint(TokenizerConfig(), renamed) != codes_settings_fingerprint(TokenizerConfig(), d)
    other_fields = load_config(TokenizerConfig, None, [("text_fields", "title,brand")])
    assert any(line.startswith("tokenizer.text_fields") for line in
               settings_diff(base, codes_settings(other_fields, d)))
    assert settings_diff(base, codes_settings(TokenizerConfig(), [d])) == []
