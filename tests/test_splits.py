"""Leave-one-out splits (PROTOCOL.md), sliding windows, history caps and leakage-free co-occurrence."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megarec.data.domain import Domain
from megarec.data.sample import load_sample
from megarec.data.splits import cooccurrence_positives, leave_one_out


def domain_of(seqs: list[list[int]], num_items: int | None = None) -> Domain:
    n = num_items if num_items is not None else max((max(s) for s in seqs if s), default=-1) + 1
    return Domain("T", [f"i{k}" for k in range(n)], [f"u{u}" for u in range(len(seqs))],
                  [np.asarray(s, dtype=np.int64) for s in seqs])


def as_lists(samples) -> list[tuple[int, list[int], int]]:
    return [(int(u), h.tolist(), int(t)) for u, h, t in zip(samples.users, samples.histories, samples.targets)]


def test_leave_one_out_by_hand():
    d = domain_of([[0, 1, 2, 3, 4, 5], [6, 7], [2, 0, 7, 1]])
    s = leave_one_out(d, max_len=3)
    # user 0: train [0,1,2,3], valid 4, test 5; user 1 too short; user 2: train [2,0], valid 7, test 1
    assert as_lists(s.train) == [(0, [0], 1), (0, [0, 1], 2), (0, [0, 1, 2], 3), (2, [2], 0)]
    assert as_lists(s.valid) == [(0, [1, 2, 3], 4), (2, [2, 0], 7)]
    assert as_lists(s.test) == [(0, [2, 3, 4], 5), (2, [2, 0, 7], 1)]  # test history holds the valid item
    assert [t.tolist() for t in s.train_sequences] == [[0, 1, 2, 3], [], [2, 0]]
    assert len(s.train) == 4 and len(s.valid) == len(s.test) == 2


def test_min_len_and_bad_max_len():
    d = domain_of([[0, 1, 2], [3, 4]])
    s = leave_one_out(d, max_len=20)
    assert as_lists(s.valid) == [(0, [0], 1)] and as_lists(s.test) == [(0, [0, 1], 2)] and len(s.train) == 0
    assert len(leave_one_out(d, min_len=4).test) == 0
    with pytest.raises(ValueError, match="max_len"):
        leave_one_out(d, max_len=0)


def check_split(d: Domain, max_len: int) -> None:
    """Every PROTOCOL.md property of a split, checked user by user against the raw sequences."""
    s = leave_one_out(d, max_len=max_len)
    train = {u: [] for u in range(d.num_users)}
    for u, h, t in as_lists(s.train):
        train[u].append((h, t))
    valid = {u: (h, t) for u, h, t in as_lists(s.valid)}
    test = {u: (h, t) for u, h, t in as_lists(s.test)}
    for u, seq in enumerate(x.tolist() for x in d.sequences):
        if len(seq) < 3:
            assert u not in valid and u not in test and not train[u] and len(s.train_sequences[u]) == 0
            continue
        part = seq[:-2]
        assert s.train_sequences[u].tolist() == part
        # sliding windows: one sample per prefix, in order, history = the max_len items before the target
        assert train[u] == [(part[max(0, t - max_len):t], part[t]) for t in range(1, len(part))]
        assert valid[u] == (part[-max_len:], seq[-2])
        assert test[u] == (seq[:-1][-max_len:], seq[-1])
        assert all(len(h) <= max_len for h, _ in train[u])
        # no leakage: training samples of u only see u's training part
        assert all(set(h) | {t} <= set(part) for h, t in train[u])
    pos = cooccurrence_positives(s.train_sequences, d.num_items)
    naive: dict[int, set[int]] = {i: set() for i in range(d.num_items)}
    for part in s.train_sequences:
        for a, b in zip(part.tolist(), part.tolist()[1:]):
            if a != b:
                naive[a].add(b)
                naive[b].add(a)
    assert [p.tolist() for p in pos] == [sorted(naive[i]) for i in range(d.num_items)]
    # a valid/test target can be a positive or a training target only through some training part
    in_train = set(np.concatenate(s.train_sequences).tolist()) if s.train_sequences else set()
    train_targets = set(s.train.targets.tolist())
    positives = {j for p in pos for j in p.tolist()}
    for t in s.valid.targets.tolist() + s.test.targets.tolist():
        if t not in in_train:
            assert t not in train_targets and t not in positives and len(pos[t]) == 0


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 11), min_size=0, max_size=14), min_size=1, max_size=12),
       max_len=st.integers(1, 6))
def test_split_properties_random(seqs, max_len):
    check_split(domain_of(seqs, num_items=12), max_len)


def test_split_properties_on_the_sample():
    d = load_sample()[0]
    check_split(d, max_len=20)
    check_split(d, max_len=2)
    s = leave_one_out(d, max_len=20)
    assert len(s.valid) == len(s.test) == d.num_users
    assert len(s.train) == d.num_interactions - 3 * d.num_users


def test_cooccurrence_excludes_held_out_neighbours():
    # item 9 is only ever a valid/test target; the edge 3-9 and 9-4 must not appear
    d = domain_of([[1, 2, 3, 9, 4], [2, 1, 5, 6, 9]], num_items=10)
    s = leave_one_out(d)
    pos = cooccurrence_positives(s.train_sequences, d.num_items)
    assert pos[9].tolist() == [] and pos[3].tolist() == [2] and pos[4].tolist() == []
    assert pos[1].tolist() == [2, 5] and pos[2].tolist() == [1, 3]
    assert [p.tolist() for p in cooccurrence_positives([], 3)] == [[], [], []]
