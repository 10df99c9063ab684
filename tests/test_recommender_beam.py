"""Item trie and trie-constrained beam search against exhaustive scoring and a naive beam search."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megarec.data.code_vocab import CodeVocab
from megarec.data.domain import DataError
from megarec.recommender.beam_search import beam_search
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig
from megarec.recommender.t5_decode import GroupedBeamDecoder
from megarec.recommender.trie import ItemTrie

TINY = T5RecConfig(num_layers=2, num_decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, dropout=0.0)


def _unique_codes(sizes, n, seed):
    rng = np.random.default_rng(seed)
    every = np.array(list(itertools.product(*[range(k) for k in sizes])))
    return every[rng.choice(len(every), n, replace=False)]


def _setup(sizes, n_items, seed=0, codes=None):
    torch.manual_seed(seed)
    vocab = CodeVocab(sizes)
    codes = _unique_codes(sizes, n_items, seed) if codes is None else codes
    tok = vocab.item_tokens(codes)
    model = GenerativeRecommender(TINY, vocab).eval()
    rng = np.random.default_rng(seed)
    ids, mask = vocab.encode_histories([rng.integers(0, len(codes), n) for n in (3, 1, 5, 2)], tok)
    return vocab, tok, model, ids, mask


def _check_against_exhaustive(items, scores, exhaustive, k):
    """Returned scores are the items' teacher-forced scores and equal the exhaustive top-k (ties may reorder)."""
    want = exhaustive.topk(min(k, exhaustive.shape[1]), dim=1).values
    torch.testing.assert_close(scores[:, :want.shape[1]], want, atol=1e-4, rtol=0)
    got = exhaustive.gather(1, items[:, :want.shape[1]].clamp(min=0))
    torch.testing.assert_close(got, scores[:, :want.shape[1]], atol=1e-4, rtol=0)


def _naive_beam(model, ids, mask, tok, beam):
    """Reference: Python dict trie, a full (uncached) decoder pass per beam per level."""
    vocab = model.vocab
    allowed: dict[tuple, set] = {}
    for row in tok.tolist():
        for level in range(len(row)):
            allowed.setdefault(tuple(row[:level]), set()).add(row[level])
    results = []
    for b in range(ids.shape[0]):
        beams = [((), 0.0)]
        for level in range(tok.shape[1]):
            cands = []
            for prefix, score in beams:
                dec = torch.tensor([[vocab.PAD, *prefix]])
                logits = model.t5(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], decoder_input_ids=dec).logits
                logp = logits[0, -1].log_softmax(-1)
                cands += [(prefix + (t,), score + logp[t].item()) for t in allowed[prefix]]
            beams = sorted(cands, key=lambda c: -c[1])[:beam]
        results.append(beams)
    return results


# --------------------------------------------------------------------------- trie
@pytest.mark.parametrize("sizes,n", [([4, 5, 3], 25), ([3, 3], 9), ([2, 3, 2, 4], 30), ([6], 4)])
def test_trie_matches_dict_trie(sizes, n):
    vocab = CodeVocab(sizes)
    tok = vocab.item_tokens(_unique_codes(sizes, n, seed=n))
    trie = ItemTrie(tok, len(sizes), vocab)
    # walk every prefix: children tokens equal the dict trie's
    for level in range(len(sizes)):
        prefixes = sorted({tuple(r[:level]) for r in tok.tolist()})
        pid = trie.prefix_id(torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), level))
        assert pid.tolist() == list(range(len(prefixes)))    # lexicographic numbering
        child, ctok, valid = trie.children(level, pid)
        for p, row_tok, row_valid in zip(prefixes, ctok.tolist(), valid.tolist()):
            want = sorted({r[level] for r in tok.tolist() if tuple(r[:level]) == p})
            assert [t for t, v in zip(row_tok, row_valid) if v] == want
    leaves = trie.prefix_id(torch.from_numpy(tok))
    items, _ = trie.leaf_to_items(leaves.view(-1, 1), torch.zeros(n, 1), 1)
    assert items.view(-1).tolist() == list(range(n))
    missing = torch.tensor([[1] * len(sizes)])                 # PAD-like token: no item has it
    assert trie.prefix_id(missing).tolist() == [-1]


def test_trie_rejects_bad_tokens():
    vocab = CodeVocab([3, 3])
    with pytest.raises(DataError, match="level"):
        ItemTrie(np.array([[2, 3]]), 2, vocab)                  # 3 is a level-0 token at level 1
    with pytest.raises(DataError, match="levels"):
        ItemTrie(np.array([[2, 5, 6]]), 2)
    with pytest.raises(DataError, match="non-empty"):
        ItemTrie(np.zeros((0, 2), dtype=np.int64))


# --------------------------------------------------------------------------- grouped decoder
@pytest.mark.parametrize("scale", [True, False])
def test_grouped_decoder_matches_hf_forward(scale):
    """Step-by-step logits equal HF's teacher-forced logits of each beam's token path, across
    beam reordering, duplication and a width change; with and without output scaling."""
    torch.manual_seed(7)
    vocab = CodeVocab([5, 4, 6, 3])
    cfg = T5RecConfig(num_layers=2, num_decoder_layers=3, d_model=16, d_ff=32, num_heads=2, d_kv=8, dropout=0.0,
                      scale_decoder_outputs=scale, feed_forward_proj="gated-gelu")
    model = GenerativeRecommender(cfg, vocab).eval()
    ids = torch.randint(2, vocab.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    enc = model.encode(ids, mask).last_hidden_state
    dec = GroupedBeamDecoder(model.t5, enc, mask)
    paths = torch.zeros(3, 1, 1, dtype=torch.long)             # [B, W, steps so far]: the start token
    gen = torch.Generator().manual_seed(0)
    for width in (4, 4, 2):
        logits = dec.step(paths[:, :, -1])
        flat = paths.reshape(-1, paths.shape[-1])
        ref = model.t5(input_ids=ids.repeat_interleave(paths.shape[1], 0),
                       attention_mask=mask.repeat_interleave(paths.shape[1], 0), decoder_input_ids=flat).logits
        torch.testing.assert_close(logits, ref[:, -1].view(3, paths.shape[1], -1), atol=1e-5, rtol=1e-5)
        parent = torch.randint(0, paths.shape[1], (3, width), generator=gen)
        dec.select(parent)
        new_tok = torch.randint(2, vocab.vocab_size, (3, width, 1), generator=gen)
        paths = torch.cat([paths[torch.arange(3)[:, None], parent], new_tok], -1)


# --------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("impl", ["grouped", "hf"])
def test_wide_beam_equals_exhaustive_scoring(impl):
    vocab, tok, model, ids, mask = _setup([4, 5, 3], 25)
    trie = ItemTrie(tok, 3, vocab)
    exhaustive = model.sequence_log_probs(ids, mask, torch.from_numpy(tok))
    # beam 20 >= every level's prefix count (4, <= 20, then 25 leaves): exact top-20
    items, scores = beam_search(model, ids, mask, trie, 20, impl=impl)
    assert items.shape == (4, 20) and items.dtype == torch.int64
    _check_against_exhaustive(items, scores, exhaustive, 20)
    for row in items.tolist():
        assert len(set(row)) == 20 and min(row) >= 0


def test_narrow_beam_equals_naive_beam_search():
    """Beam 5 prunes: both decoders must make exactly the naive search's choices."""
    vocab, tok, model, ids, mask = _setup([4, 5, 3], 40, seed=1)
    trie = ItemTrie(tok, 3, vocab)
    exhaustive = model.sequence_log_probs(ids, mask, torch.from_numpy(tok))
    pos = {tuple(r): i for i, r in enumerate(tok.tolist())}
    naive = _naive_beam(model, ids, mask, tok, 5)
    for impl in ("grouped", "hf"):
        items, scores = beam_search(model, ids, mask, trie, 5, impl=impl)
        torch.testing.assert_close(exhaustive.gather(1, items), scores, atol=1e-4, rtol=0)
        for b, beams in enumerate(naive):
            assert [pos[p] for p, _ in beams] == items[b].tolist(), impl
            np.testing.assert_allclose([s for _, s in beams], scores[b].numpy(), atol=1e-4)


def test_top_k_and_fewer_items_than_beam():
    vocab, tok, model, ids, mask = _setup([3, 2], 5, seed=2)
    trie = ItemTrie(tok, 2, vocab)
    items, scores = beam_search(model, ids, mask, trie, 8)
    assert items.shape == (4, 8)
    assert (items[:, 5:] == -1).all() and torch.isinf(scores[:, 5:]).all()
    assert sorted(items[0, :5].tolist()) == list(range(5))
    exhaustive = model.sequence_log_probs(ids, mask, torch.from_numpy(tok))
    _check_against_exhaustive(items, scores, exhaustive, 5)
    top3, s3 = beam_search(model, ids, mask, trie, 8, top_k=3)
    assert torch.equal(top3, items[:, :3]) and torch.equal(s3, scores[:, :3])


def test_beam_with_dedup_level():
    """TIGER: items sharing semantic codes get a distinguishing last code (just another level)."""
    sem = np.array([[0, 1], [0, 1], [0, 1], [2, 0], [2, 0], [1, 1], [3, 2], [0, 0]])
    dedup = np.zeros(len(sem), dtype=np.int64)
    for i in range(len(sem)):
        dedup[i] = sum((sem[j] == sem[i]).all() for j in range(i))
    codes = np.concatenate([sem, dedup[:, None]], 1)
    vocab, tok, model, ids, mask = _setup([4, 3, 3], len(codes), seed=3, codes=codes)
    trie = ItemTrie(tok, 3, vocab)
    assert trie.num_colliding_items == 0
    items, scores = beam_search(model, ids, mask, trie, 8)
    assert sorted(items[0].tolist()) == list(range(8))
    _check_against_exhaustive(items, scores, model.sequence_log_probs(ids, mask, torch.from_numpy(tok)), 8)


def test_colliding_codes_return_every_item_once():
    codes = np.array([[0, 1], [1, 0], [0, 1], [2, 2], [0, 1], [1, 0]])   # items 0,2,4 and 1,5 collide
    vocab, tok, model, ids, mask = _setup([3, 3], len(codes), seed=4, codes=codes)
    trie = ItemTrie(tok, 2, vocab)
    assert trie.num_colliding_items == 5 and trie.max_leaf_items == 3
    items, scores = beam_search(model, ids, mask, trie, 4)
    exhaustive = model.sequence_log_probs(ids, mask, torch.from_numpy(tok))
    for b in range(len(items)):
        assert len(set(items[b].tolist())) == 4 and min(items[b].tolist()) >= 0
        torch.testing.assert_close(exhaustive[b, items[b]], scores[b], atol=1e-4, rtol=0)
        # colliding items come together, in item order
        order = exhaustive[b, [0, 1, 3]].argsort(descending=True).tolist()
        groups = [[0, 2, 4], [1, 5], [3]]
        flat = [i for g in order for i in groups[g]]
        assert items[b].tolist() == flat[:4]


def test_soft_one_hot_inputs_give_the_same_beams():
    vocab, tok, model, ids, mask = _setup([4, 5, 3], 25, seed=5)
    trie = ItemTrie(tok, 3, vocab)
    hard = beam_search(model, ids, mask, trie, 6)
    soft = beam_search(model, None, mask, trie, 6, soft_inputs=vocab.one_hot(ids))
    assert torch.equal(hard[0], soft[0]) and torch.equal(hard[1], soft[1])


def test_restores_training_mode_and_checks_levels():
    vocab, tok, model, ids, mask = _setup([4, 5, 3], 25, seed=6)
    model.train()
    beam_search(model, ids, mask, ItemTrie(tok, 3, vocab), 3)
    assert model.training
    with pytest.raises(ValueError, match="levels"):
        beam_search(model, ids, mask, ItemTrie(tok[:, :2]), 3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, ids, mask, ItemTrie(tok, 3, vocab), 0)
