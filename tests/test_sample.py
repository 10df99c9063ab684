"""The embedded sample and tools/make_sample.py, which writes it."""
from __future__ import annotations

import numpy as np
import pytest

from megarec.data.domain import Domain
from megarec.data.readers import read_domain
from megarec.data.sample import SAMPLE_DIR, load_sample, sample_paths
from tests.tools import load_tool


def test_sample_is_small_real_and_has_text():
    total = sum(p.stat().st_size for p in SAMPLE_DIR.glob("*/*.json"))
    assert total < 1.5 * 1024 * 1024
    assert [p.name for p in sample_paths()] == ["Scientific", "Office", "Games"]
    for d in load_sample():
        assert d.num_users == 300 and d.has_text and d.item_image is None
        assert min(len(s) for s in d.sequences) >= 5
        assert d.item_ids == [str(i) for i in range(d.num_items)]  # re-indexed
        assert np.array_equal(np.unique(np.concatenate(d.sequences)), np.arange(d.num_items))  # every item used
        assert all(rec["title"] for rec in d.item_text)
        assert max(len(v) for rec in d.item_text for v in rec.values()) <= 300


def synthetic(num_users: int = 40, num_items: int = 30, seed: int = 3) -> Domain:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, num_items, size=int(rng.integers(2, 12))) for _ in range(num_users)]
    text = [{"title": f"item {i}", "description": ("word " * (i + 1)).strip()} for i in range(num_items)]
    return Domain("Syn", [f"raw{i}" for i in range(num_items)], [f"user{u}" for u in range(num_users)], seqs, text)


def test_subsample_is_a_deterministic_real_subset():
    tool = load_tool("make_sample")
    d = synthetic()
    a = tool.subsample(d, users=8, items=12, min_len=3, seed=1, max_chars=22)
    b = tool.subsample(d, users=8, items=12, min_len=3, seed=1, max_chars=22)
    assert a.users == b.users and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert a.users != tool.subsample(d, users=8, items=12, min_len=3, seed=2).users
    counts = np.bincount(np.concatenate(d.sequences), minlength=d.num_items)
    popular = set(np.argsort(-counts, kind="stable")[:12].tolist())
    raw_of_new = {}
    for user, seq in zip(a.users, a.sequences):
        orig = d.sequences[d.users.index(user)]
        kept = [i for i in orig.tolist() if i in popular]  # the user's popular-item interactions, in order
        assert len(seq) == len(kept) >= 3
        for new, old in zip(seq.tolist(), kept):
            assert raw_of_new.setdefault(new, old) == old  # one consistent re-indexing
    assert a.item_ids == [str(i) for i in range(a.num_items)] and len(raw_of_new) == a.num_items
    for new, old in raw_of_new.items():
        assert a.item_text[new]["title"] == f"item {old}"
        full = d.item_text[old]["description"]
        cut = a.item_text[new]["description"]
        assert len(cut) <= 22 and full.startswith(cut) and (cut == full or full[len(cut)] == " ")
    with pytest.raises(ValueError, match="only .* users have >= 3"):
        tool.subsample(d, users=1000, items=12, min_len=3)


def test_make_sample_main_writes_readable_json_layout(tmp_path):
    tool = load_tool("make_sample")
    src = tmp_path / "src"
    from megarec.data.readers.json_layout import write
    write(synthetic(), src / "Syn")
    assert tool.main(["--src", str(src), "--out", str(tmp_path / "out"), "--domains", "Syn", "--users", "6",
                      "--items", "15", "--min-len", "3"]) == 0
    d = read_domain(tmp_path / "out" / "Syn")
    assert d.name == "Syn" and d.num_users == 6 and d.has_text
