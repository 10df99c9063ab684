"""Code sequences: samples + codes -> tokens, several domains in one code space."""
import numpy as np
import pytest
import torch

from megarec.data.code_sequences import CodeSequenceData, concat_samples, encode_samples, merge_codes, select_codes
from megarec.data.code_vocab import EOS, PAD, CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, Domain
from megarec.data.splits import leave_one_out


def _domain(name: str, n_items: int, seqs: list[list[int]]) -> Domain:
    return Domain(name, [f"i{i}" for i in range(n_items)], [f"u{u}" for u in range(len(seqs))],
                  [np.asarray(s, dtype=np.int64) for s in seqs])


A = _domain("A", 5, [[0, 1, 2, 3], [4, 3, 2], [1, 0, 4, 2, 3]])
B = _domain("B", 4, [[3, 2, 1, 0, 1], [0, 1, 2]])


def _codes(domains, sizes, rng=0) -> CodesFile:
    keys = [f"{d.name}/{i}" for d in domains for i in d.item_ids]
    r = np.random.default_rng(rng)
    codes = np.stack([r.integers(0, k, len(keys)) for k in sizes], 1)
    return CodesFile(keys, codes, list(sizes))


def _tokens_of(codes: np.ndarray, sizes) -> np.ndarray:
    """Naive token ids: 2 + sum of the earlier codebook sizes + code."""
    out = np.zeros_like(codes)
    for n, row in enumerate(codes):
        for lv, c in enumerate(row):
            out[n, lv] = 2 + sum(sizes[:lv]) + c
    return out


@pytest.mark.parametrize("sizes", [[3, 4], [5, 2, 3, 4]])
def test_shared_code_space_tokens_and_labels(sizes):
    codes = _codes([A, B], sizes)
    data = CodeSequenceData([A, B], codes, max_len=3)
    tok = _tokens_of(codes.codes, sizes)
    np.testing.assert_array_equal(data.item_tokens, tok)
    assert data.vocab.vocab_size == 2 + sum(sizes)
    L = len(sizes)
    # every training row: the history's tokens (last <= 3 items, global index), EOS, PAD; labels = target tokens
    split_a, split_b = leave_one_out(A, 3), leave_one_out(B, 3)
    expect = [(h, t) for h, t in zip(split_a.train.histories, split_a.train.targets)]
    expect += [(h + A.num_items, t + A.num_items) for h, t in zip(split_b.train.histories, split_b.train.targets)]
    assert len(data.train) == len(expect)
    for row, (h, t) in enumerate(expect):
        want = list(tok[h].reshape(-1)) + [EOS]
        got = data.train.input_ids[row].tolist()
        assert got[:len(want)] == want and all(x == PAD for x in got[len(want):])
        assert data.train.lengths[row] == len(want)
        assert data.train.labels[row].tolist() == list(tok[t])
        assert int(data.train.targets[row]) == t
        assert int(data.train.domains[row]) == (0 if row < len(split_a.train) else 1)
    # valid / test are per domain, targets in the global item space
    assert [len(v) for v in data.valid] == [3, 2]
    assert data.test[1].targets.tolist() == [1 + A.num_items, 2 + A.num_items]
    assert data.valid[1].labels.shape == (2, L)
    np.testing.assert_array_equal(data.domain_items(1), np.arange(5, 9))


def test_batch_trims_padding_and_moves_rows():
    data = CodeSequenceData([A, B], _codes([A, B], [4, 4]), max_len=3)
    short = int(np.argmin(data.train.lengths))
    b = data.train.batch([short])
    assert b["input_ids"].shape == (1, data.train.lengths[short])
    assert b["attention_mask"].sum() == data.train.lengths[short]
    full = data.train.batch(np.arange(len(data.train)))
    assert full["input_ids"].shape[1] == data.train.lengths.max()
    assert torch.equal(full["labels"], data.train.labels)
    with pytest.raises(ValueError):
        data.train.batch([])


def test_history_is_cut_to_max_len():
    data = CodeSequenceData([A], _codes([A], [4, 4]), max_len=2)
    # every encoder row holds at most 2 items of L=2 tokens plus EOS
    assert data.train.lengths.max() <= 2 * 2 + 1
    assert data.test[0].lengths.tolist() == [5, 5, 5]


def test_codes_file_may_cover_more_domains_than_the_data():
    both = _codes([A, B], [4, 3, 5])
    only_b = CodeSequenceData([B], both, max_len=3)
    np.testing.assert_array_equal(only_b.codes, both.codes[A.num_items:])
    assert only_b.vocab.vocab_size == 2 + 4 + 3 + 5
    reordered = select_codes(both, [f"B/i{i}" for i in (3, 0)])
    np.testing.assert_array_equal(reordered, both.codes[[A.num_items + 3, A.num_items]])


def test_codes_mismatch_is_a_clear_error():
    codes = _codes([A], [4, 4])
    with pytest.raises(DataError, match=r"without a code: \['B/i0'"):
        CodeSequenceData([A, B], codes, max_len=3, codes_source="codes.safetensors")
    with pytest.raises(DataError, match="codes.safetensors"):
        CodeSequenceData([B], codes, max_len=3, codes_source="codes.safetensors")


def test_concat_widens_padding():
    vocab = CodeVocab([4, 4])
    tokens = vocab.item_tokens(_codes([A], [4, 4]).codes)
    s1 = encode_samples(leave_one_out(A, 1).train, vocab, tokens, max_items=1)
    s2 = encode_samples(leave_one_out(A, 3).train, vocab, tokens, max_items=3)
    both = concat_samples([s1, s2])
    assert both.input_ids.shape[1] == max(s1.input_ids.shape[1], s2.input_ids.shape[1])
    assert torch.equal(both.input_ids[: len(s1), : s1.input_ids.shape[1]], s1.input_ids)
    assert (both.input_ids[: len(s1), s1.input_ids.shape[1]:] == PAD).all()
    assert len(both) == len(s1) + len(s2)


# ----------------------------------------------------------------------------- merge_codes
def test_merge_codes_of_distinct_ids_concatenates_them():
    a = CodesFile(["A/0", "A/1"], np.array([[0, 1], [1, 1]]), [4, 4])
    b = CodesFile(["B/0"], np.array([[2, 3]]), [4, 4])
    m = merge_codes([a, b])
    assert m.item_keys == ["A/0", "A/1", "B/0"] and m.codes.tolist() == [[0, 1], [1, 1], [2, 3]]
    assert m.collision_rate() == 0.0


def test_merge_codes_refuses_an_id_shared_across_files_and_names_the_items():
    a = CodesFile(["A/0", "A/1"], np.array([[0, 1], [1, 1]]), [4, 4])
    b = CodesFile(["B/0", "B/1"], np.array([[2, 3], [1, 1]]), [4, 4])     # B/1 has A/1's ID
    with pytest.raises(DataError, match="would give 2 items the ID of an item from another codes file") as err:
        merge_codes([a, b], names=["a.safetensors", "b.safetensors"])
    msg = str(err.value)
    assert "'A/1'" in msg and "'B/1'" in msg and "(1, 1)" in msg
    assert "a.safetensors" in msg and "b.safetensors" in msg and "tokenize the domains together" in msg


def test_merge_codes_dedup_levels_collide_too():
    # TIGER files: the same semantic code with dedup token 0 in both files is one ID for two items
    a = CodesFile(["A/0"], np.array([[3, 0]]), [4, 1], dedup_level=True)
    b = CodesFile(["B/0", "B/1"], np.array([[3, 0], [3, 1]]), [4, 2], dedup_level=True)
    with pytest.raises(DataError, match="tokenize the domains together"):
        merge_codes([a, b])


def test_merge_codes_keeps_collisions_inside_one_file_and_refuses_repeated_keys():
    a = CodesFile(["A/0", "A/1"], np.array([[0, 1], [0, 1]]), [4, 4], stats={"policy": "none"})
    b = CodesFile(["B/0"], np.array([[2, 3]]), [4, 4])
    assert merge_codes([a, b]).collision_rate() == pytest.approx(2 / 3)   # the file's own choice (policy none)
    with pytest.raises(DataError, match="appear in more than one codes file.*'A/0'"):
        merge_codes([a, CodesFile(["A/0"], np.array([[3, 3]]), [4, 4])])
