"""Tokenizer inputs: text embeddings from an HF encoder (a tiny random BERT), caching, collaborative embeddings."""
import numpy as np
import pytest
import torch

from megarec.data.domain import DataError, Domain, MissingTextError
from megarec.data.embeddings import save_item_embeddings
from megarec.tokenizer import encoders
from megarec.tokenizer.encoders import collaborative_embeddings, encode_texts, mean_pool, text_embeddings
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def tiny_domain(with_text=True):
    texts = [{"title": "red lamp", "brand": "kit"}, {"title": "blue steel box kit long tape"},
             {"title": "green glue"}, {"title": "short cable", "brand": "red"}, {"title": ""}]
    return Domain("D", [f"i{i}" for i in range(5)], ["u0"], [np.array([0, 1, 2, 3, 4])],
                  item_text=texts if with_text else None)


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_encode_texts_equals_one_text_at_a_time(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    texts = ["red lamp", "blue steel box kit long tape", "green", "short cable red", ""]
    emb = encode_texts(texts, tiny_bert, batch_size=2, normalize=False, progress=False)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    for i, t in enumerate(texts):                         # no padding at all: the reference mean
        with torch.no_grad():
            ref = model(**tok([t], return_tensors="pt")).last_hidden_state[0].mean(0)
        assert torch.allclose(emb[i], ref, atol=1e-5), i
    unit = encode_texts(texts, tiny_bert, batch_size=3, normalize=True, progress=False)
    assert torch.allclose(unit, torch.nn.functional.normalize(emb, dim=-1), atol=1e-6)
    assert torch.allclose(unit.norm(dim=1), torch.ones(5), atol=1e-6)


def test_text_embeddings_are_cached_and_recomputed_when_stale(tiny_bert, tmp_path, monkeypatch):
    dom = tiny_domain()
    cache = tmp_path / "cache.safetensors"
    first = text_embeddings(dom, tiny_bert, ["title", "brand"], cache=cache, progress=False)
    assert first.shape == (5, 16) and cache.is_file()
    direct = encode_texts(dom.texts(["title", "brand"]), tiny_bert, progress=False)
    assert torch.allclose(first, direct, atol=1e-6)

    def boom(*a, **k):
        raise AssertionError("the encoder ran although the cache matches")

    monkeypatch.setattr(encoders, "encode_texts", boom)
    again = text_embeddings(dom, tiny_bert, ["title", "brand"], cache=cache, progress=False)
    assert torch.equal(again, first)
    with pytest.raises(AssertionError, match="encoder ran"):    # other fields: the cache does not apply
        text_embeddings(dom, tiny_bert, ["title"], cache=cache, progress=False)


def test_domain_without_text_and_missing_encoder_fail_clearly(tiny_bert, tmp_path):
    with pytest.raises(MissingTextError, match="train-tokenizer needs item text"):
        text_embeddings(tiny_domain(with_text=False), tiny_bert, who="train-tokenizer")
    with pytest.raises(DataError, match="does not exist"):
        encode_texts(["x"], tmp_path / "nope", progress=False)


def test_default_encoder_is_the_bundled_minilm():
    path = encoders.default_encoder_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_collaborative_embeddings_follow_domain_order(tmp_path):
    dom = tiny_domain(with_text=False)
    emb = torch.arange(20, dtype=torch.float32).view(5, 4)
    keys = [f"D/i{i}" for i in range(5)]
    path = tmp_path / "sasrec.safetensors"
    save_item_embeddings(path, emb[[4, 2, 0, 1, 3]], [keys[i] for i in [4, 2, 0, 1, 3]], source="sasrec")
    assert torch.equal(collaborative_embeddings(path, dom), emb)
    save_item_embeddings(path, emb[:3], keys[:3])
    with pytest.raises(DataError, match="no embedding for 2 items"):
        collaborative_embeddings(path, dom)


def test_sorted_encoding_equals_unsorted_and_keeps_input_order(tiny_bert):
    from transformers import AutoTokenizer

    from megarec.tokenizer.encoders import length_order, padded_tokens, token_lengths

    rng = np.random.default_rng(0)
    words = "red blue green lamp cable tape steel glue box kit long short".split()
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(0, 30, 23)]
    texts[5] = texts[17]                                    # equal texts stay equal, in their own rows
    sorted_ = encode_texts(texts, tiny_bert, batch_size=4, normalize=False, progress=False)
    plain = encode_texts(texts, tiny_bert, batch_size=4, normalize=False, progress=False, sort_by_length=False)
    assert torch.allclose(sorted_, plain, atol=1e-5)
    alone = encode_texts(texts[::-1], tiny_bert, batch_size=4, normalize=False, progress=False)
    assert torch.allclose(alone.flip(0), sorted_, atol=1e-5)         # row i is text i, whatever the order
    assert torch.allclose(sorted_[5], sorted_[17], atol=1e-6)
    # the point of sorting: batches of similar length pad less
    lengths = token_lengths(AutoTokenizer.from_pretrained(tiny_bert), texts, 256)
    order = length_order(lengths)
    assert [lengths[i] for i in order] == sorted(lengths) and length_order(lengths, False) == list(range(23))
    assert padded_tokens(lengths, order, 4) < padded_tokens(lengths, list(range(23)), 4)


def test_token_lengths_follow_truncation(tiny_bert):
    from transformers import AutoTokenizer

    from megarec.tokenizer.encoders import padded_tokens, token_lengths

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    assert token_lengths(tok, ["", "red lamp", "red " * 40], 8) == [2, 4, 8]   # [CLS] ... [SEP]
    assert padded_tokens([2, 4, 8], [0, 1, 2], 2) == 2 * 4 + 8
