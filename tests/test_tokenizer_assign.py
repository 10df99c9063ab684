"""Catalogue code assignment: collision policies, statistics, the codes file."""
import itertools
import math

import numpy as np
import pytest
import torch

from megarec.data.codes import CodesFile
from megarec.tokenizer import (CollisionError, ResidualQuantizer, add_dedup_level, assign_catalogue, collision_rate,
                               level_stats, random_collision_rate, resolve_collisions)
from megarec.tokenizer.assign import spill_overflow


def sqdist(x, C):
    return ((x[:, None, :] - C[None]) ** 2).sum(-1).numpy().astype(np.float64)


def brute_force(codes, x, C):
    """Least total squared distance over every injective last-code assignment of each colliding prefix group."""
    d = sqdist(x, C)
    ids = [tuple(r) for r in codes]
    best_total = 0.0
    for prefix in {tuple(codes[i, :-1]) for i in range(len(codes)) if ids.count(ids[i]) > 1}:
        members = [i for i in range(len(codes)) if tuple(codes[i, :-1]) == prefix]
        best_total += min(sum(d[i, c] for i, c in zip(members, perm))
                          for perm in itertools.permutations(range(len(C)), len(members)))
    return best_total


def nearest(x, C):
    return sqdist(x, C).argmin(1)


def test_two_items_on_one_code_the_farther_moves_to_its_next_nearest():
    C = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    x = torch.tensor([[0.1, 0.0], [0.4, 0.0], [5.0, 4.9]])       # items 0 and 1 both nearest to code 0
    codes = np.array([[7, 0], [7, 0], [7, 3]])
    new, info = resolve_collisions(codes, x, C)
    assert new.tolist() == [[7, 0], [7, 1], [7, 3]]              # item 1 (farther from code 0) -> code 1
    assert info["moved"] == 1 and info["groups"] == 1
    extra = float(((x[1] - C[1]) ** 2).sum() - ((x[1] - C[0]) ** 2).sum())
    assert info["extra_distance_mean"] == pytest.approx(extra, rel=1e-5)


def test_group_members_shift_when_cheaper_and_other_prefixes_stay():
    C = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    x = torch.tensor([[0.0], [0.1], [0.2], [1.0], [0.0]])
    # items 0-3 share prefix (2,); item 3 holds code 1 alone; item 4 has another prefix and the same last code.
    # Keeping item 3 on code 1 costs 3.61 + 7.84; shifting everyone one code up costs 0.81 + 3.24 + 4.
    codes = np.array([[2, 0], [2, 0], [2, 0], [2, 1], [5, 0]])
    new, info = resolve_collisions(codes, x, C)
    assert new.tolist() == [[2, 0], [2, 1], [2, 2], [2, 3], [5, 0]]
    assert info["moved"] == 3 and collision_rate(new) == 0.0


def test_total_extra_distance_is_minimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(8):
        K = 5
        C = torch.tensor(rng.normal(size=(K, 2)), dtype=torch.float32)
        x = torch.tensor(rng.normal(scale=0.6, size=(7, 2)), dtype=torch.float32)
        codes = np.stack([np.arange(7) % 2, nearest(x, C)], 1)            # prefix groups of 4 and 3
        if collision_rate(codes) == 0:
            x[1] = x[0] + 0.01
            codes[1] = [codes[0, 0], nearest(x[1:2], C)[0]]
        new, _ = resolve_collisions(codes, x, C)
        assert collision_rate(new) == 0.0
        assert np.array_equal(new[:, 0], codes[:, 0])                      # prefixes never change
        d = sqdist(x, C)
        ids = [tuple(r) for r in codes]
        touched = {tuple(codes[i, :-1]) for i in range(7) if ids.count(ids[i]) > 1}
        ours = sum(d[i, new[i, 1]] for i in range(7) if tuple(codes[i, :-1]) in touched)
        assert ours == pytest.approx(brute_force(codes, x, C), rel=1e-6)
        for i in range(7):                                                 # other groups keep their codes
            if tuple(codes[i, :-1]) not in touched:
                assert new[i, 1] == codes[i, 1]


def test_crowded_catalogue_matches_exhaustive_min_cost():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(1)
    K = 16
    C = torch.tensor(rng.normal(size=(K, 3)), dtype=torch.float32)
    x = torch.tensor(rng.normal(scale=0.3, size=(200, 3)), dtype=torch.float32)
    codes = np.stack([np.arange(200) % 20, nearest(x, C)], 1)        # 20 prefix groups of 10 items
    assert collision_rate(codes) > 0.3
    new, info = resolve_collisions(codes, x, C)
    assert collision_rate(new) == 0.0 and info["moved"] > 0
    d = sqdist(x, C)
    for g in range(20):                       # the g-nearest candidate pools lose nothing against all K codes
        m = np.nonzero(codes[:, 0] == g)[0]
        r, c = linear_sum_assignment(d[m])
        assert sum(d[i, new[i, 1]] for i in m) == pytest.approx(d[m][r, c].sum(), rel=1e-6)


def test_impossible_group_raises_a_clear_error():
    C = torch.eye(3)
    x = torch.zeros(4, 3)
    codes = np.array([[1, 4, 0]] * 4)
    with pytest.raises(CollisionError, match=r"4 items share the code prefix \(1, 4\).*only 3 codes"):
        resolve_collisions(codes, x, C)


def test_dedup_token_indexes_items_within_identical_ids():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    new, size = add_dedup_level(codes)
    assert size == 3
    assert new[:, 2].tolist() == [0, 0, 1, 0, 2, 1]
    assert np.array_equal(new[:, :2], codes)
    assert collision_rate(new) == 0.0
    _, size = add_dedup_level(np.array([[0], [1]]))
    assert size == 1


def test_stable_dedup_keeps_the_token_of_every_item_whose_prefix_is_unchanged():
    """Regeneration with the previous codes: item 1 leaves group (0, 0) for (1, 1): items 0 and 2 keep
    tokens 0 and 2 (a hole at 1, so the level needs 3 tokens), item 3 keeps 0 in (1, 1) and the newcomer
    takes the smallest free token there, 1. Item order alone (no previous codes) would renumber item 2."""
    previous = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 1, 0]])
    codes = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    new, size = add_dedup_level(codes, previous)
    assert new[:, 2].tolist() == [0, 1, 2, 0] and size == 3
    assert add_dedup_level(codes)[0][:, 2].tolist() == [0, 0, 1, 1]
    # an item joining a group takes a free token; nobody else in the group moves
    joined, _ = add_dedup_level(np.array([[0, 0], [0, 0], [0, 0], [0, 0]]), previous)
    assert joined[:, 2].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="previous codes have shape"):
        add_dedup_level(codes, previous[:, :2])


def test_stable_dedup_on_random_regenerations():
    """Over random regenerations: unchanged prefixes keep their token, every ID stays unique, new
    members fill the smallest free tokens of their group."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(300, 2))
    cur, _ = add_dedup_level(codes)
    for _ in range(5):
        moved = rng.random(300) < 0.2
        codes = np.where(moved[:, None], rng.integers(0, 3, size=(300, 2)), codes)
        new, size = add_dedup_level(codes, cur)
        same = (cur[:, :2] == codes).all(1)
        assert np.array_equal(new[same, 2], cur[same, 2])
        assert collision_rate(new) == 0.0 and size == new[:, 2].max() + 1
        for g in {tuple(r) for r in codes[~same]}:
            members = (codes == g).all(1)
            tokens = sorted(new[members, 2])
            kept = set(new[members & same, 2])
            fresh = [t for t in tokens if t not in kept]
            free = [t for t in range(len(tokens) + len(kept) + 1) if t not in kept][:len(fresh)]
            assert fresh == free
        cur = new


def test_level_stats_and_random_collision_rate():
    codes = np.array([[0, 1], [0, 1], [1, 1], [2, 1]])
    s = level_stats(codes, [4, 2])
    ent = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert s[0] == pytest.approx({"usage": 0.75, "entropy": ent, "perplexity": math.exp(ent)})
    assert s[1] == pytest.approx({"usage": 0.5, "entropy": 0.0, "perplexity": 1.0})
    assert collision_rate(codes) == 0.5
    assert random_collision_rate(2, [2, 2]) == pytest.approx(0.25)
    # sampling agrees with the analytic expectation
    rng = np.random.default_rng(0)
    sampled = np.mean([collision_rate(rng.integers(0, 6, size=(30, 2))) for _ in range(400)])
    assert sampled == pytest.approx(random_collision_rate(30, [6, 6]), abs=0.02)


@pytest.mark.parametrize("policy", ["utgrec", "dedup", "none"])
def test_assign_catalogue_policies_and_codes_file_round_trip(tmp_path, policy):
    torch.manual_seed(0)
    tok = ResidualQuantizer([4, 16], dim=2).eval()   # identity encoder
    x = torch.cat([torch.randn(30, 2), torch.zeros(2, 2)])   # two identical items always collide
    keys = [f"D/{i}" for i in range(32)]
    cf = assign_catalogue(tok, x, keys, policy, batch_size=7)
    assert cf.stats["collision_rate_before"] > 0
    assert cf.stats["duplicate_input_rate"] == pytest.approx(2 / 32)
    assert cf.stats["random_codes_collision_rate"] == pytest.approx(random_collision_rate(32, [4, 16]))
    if policy == "none":
        assert cf.stats["collision_rate_after"] == cf.stats["collision_rate_before"]
    else:
        assert cf.stats["collision_rate_after"] == 0.0
    assert cf.dedup_level == (policy == "dedup")
    assert cf.codebook_sizes[:2] == [4, 16] and len(cf.codebook_sizes) == (3 if policy == "dedup" else 2)
    cf.save(tmp_path / "codes.safetensors")
    back = CodesFile.load(tmp_path / "codes.safetensors")
    assert back.item_keys == keys and np.array_equal(back.codes, cf.codes)
    assert back.codebook_sizes == cf.codebook_sizes and back.dedup_level == cf.dedup_level
    assert back.stats == cf.stats
    assert len(back.stats["levels"]) == len(cf.codebook_sizes)


def test_assign_catalogue_rejects_bad_input():
    tok = ResidualQuantizer([4], dim=2).eval()
    with pytest.raises(ValueError, match="collision policy"):
        assign_catalogue(tok, torch.zeros(3, 2), ["a", "b", "c"], "random")
    with pytest.raises(Exception, match="2 item keys for 3"):
        assign_catalogue(tok, torch.zeros(3, 2), ["a", "b"], "none")


def test_two_domains_assigned_together_get_distinct_ids_where_separate_assignment_collides():
    from megarec.data.code_sequences import merge_codes
    from megarec.data.domain import DataError

    torch.manual_seed(0)
    tok = ResidualQuantizer([4, 16], dim=2).eval()
    xa = torch.randn(12, 2)
    xb = torch.cat([xa[:6], torch.randn(6, 2)])             # domain B sells six of A's items
    a = assign_catalogue(tok, xa, [f"A/{i}" for i in range(12)], "utgrec")
    b = assign_catalogue(tok, xb, [f"B/{i}" for i in range(12)], "utgrec")
    assert a.collision_rate() == 0.0 and b.collision_rate() == 0.0     # each domain on its own is fine ...
    assert CodesFile(a.item_keys + b.item_keys, np.concatenate([a.codes, b.codes]), [4, 16]).collision_rate() >= 0.5
    with pytest.raises(DataError, match="tokenize the domains together"):   # ... but their merge is refused
        merge_codes([a, b])
    keys = a.item_keys + b.item_keys
    both = assign_catalogue(tok, torch.cat([xa, xb]), keys, "utgrec")
    assert both.collision_rate() == 0.0 and len({tuple(r) for r in both.codes}) == 24
    assert both.stats["cross_domain_collision_rate_before"] >= 12 / 24     # the 6 shared items, in both domains
    dedup = assign_catalogue(tok, torch.cat([xa, xb]), keys, "dedup")
    assert dedup.collision_rate() == 0.0


def test_cross_domain_collision_rate_counts_only_ids_shared_across_domains():
    from megarec.tokenizer.assign import cross_domain_collision_rate

    codes = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]])
    keys = ["A/0", "A/1", "A/2", "B/0", "B/1"]             # (0,0) twice in A only; (1,1) in A and B
    assert cross_domain_collision_rate(codes, keys) == pytest.approx(2 / 5)
    assert collision_rate(codes) == pytest.approx(4 / 5)
    single = assign_catalogue(ResidualQuantizer([4], dim=2).eval(), torch.zeros(2, 2), ["A/0", "A/1"], "none")
    assert "cross_domain_collision_rate_before" not in single.stats


def test_assign_catalogue_refuses_repeated_item_keys():
    from megarec.data.domain import DataError

    with pytest.raises(DataError, match=r"1 item keys occur more than once, e.g. \['A/1'\]"):
        assign_catalogue(ResidualQuantizer([4], dim=2).eval(), torch.zeros(3, 2), ["A/1", "A/2", "A/1"], "none")


def test_codes_file_names_shared_ids_and_saves_atomically(tmp_path):
    cf = CodesFile(["A/0", "A/1", "B/0", "B/1"], np.array([[0, 1], [1, 1], [0, 1], [2, 2]]), [4, 4])
    assert cf.shared_ids() == [["A/0", "B/0"]]
    assert CodesFile(["A/0"], np.array([[0, 1]]), [4, 4]).shared_ids() == []
    path = tmp_path / "codes.safetensors"
    cf.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.safetensors"]     # no temporary file left behind
    assert CodesFile.load(path).item_keys == cf.item_keys


def tree_items(level_increments: list[list[list[float]]]) -> torch.Tensor:
    """``H' [N, L, d]`` whose prefix residual (Eq. 3) is the given per-level increments."""
    return torch.tensor(level_increments).cumsum(dim=1)


def test_overflowing_prefix_spills_its_cheapest_items_one_level_up():
    from megarec.tokenizer.tree import TreeSnapshot
    leaf = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    snap = TreeSnapshot(torch.zeros(1, 2), leaf, num_levels=3)
    # six items under prefix (0, 0) but only 4 last codes: the two whose level-2 increment is nearly as
    # close to another code (items 2 -> code 1: +0.1, 3 -> code 2: +0.2) move; item 1 (+0.8) stays
    level2 = [[0, 0], [0.1, 0], [0.45, 0], [0, 0.4], [0.05, 0.05], [0, 0.1]]
    level3 = [[0, 0], [1, 0], [0, 1], [5, 5], [0.1, 0], [0.9, 0]]
    h = tree_items([[[0.0, 0.0], a, b] for a, b in zip(level2, level3)])
    cf = assign_catalogue(snap, h, [f"i{k}" for k in range(6)], "utgrec")
    codes = np.asarray(cf.codes)
    assert codes[:, 1].tolist() == [0, 0, 1, 2, 0, 0]
    assert codes[2, 2] == 2 and codes[3, 2] == 3                # moved items keep their nearest last code
    assert collision_rate(codes) == 0.0 and cf.stats["collision_rate_after"] == 0.0
    spill = cf.stats["spill"]
    assert spill["spilled"] == 2 and spill["overflow_groups"] == 1
    assert spill["spill_extra_distance_max"] == pytest.approx(0.2, abs=1e-5)


def test_spill_respects_the_room_of_the_target_prefix():
    C = torch.tensor([[0.0], [1.0], [3.0]])
    x = torch.tensor([[0.0], [0.4], [0.45], [1.0], [1.1]])       # level-(L-1) inputs
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1]])   # capacity 2: (0, 0) overflows
    new, info = spill_overflow(codes, x, C, capacity=2)
    # (0, 1) is full, so the cheapest mover (item 2) goes to code 2, the next free prefix
    assert new[:, 1].tolist() == [0, 0, 2, 1, 1] and info["spilled"] == 1
    unchanged, info = spill_overflow(codes, x, C, capacity=3)
    assert (unchanged == codes).all() and info["spilled"] == 0


def test_spill_without_room_raises_a_clear_error():
    C = torch.tensor([[0.0], [1.0]])
    codes = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])   # both prefixes would need room for 3 > 2
    with pytest.raises(CollisionError, match="find no prefix with room"):
        spill_overflow(codes, torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1]]), C, capacity=2)


def test_a_tokenizer_with_dependent_levels_still_refuses_an_overflow():
    torch.manual_seed(0)
    rq = ResidualQuantizer([1, 2], dim=4).eval()                    # 1 x 2 IDs for 4 items: cannot be unique
    with pytest.raises(CollisionError, match="last codebook has only 2 codes"):
        assign_catalogue(rq, torch.randn(4, 4), [f"i{k}" for k in range(4)], "utgrec")


def test_spill_on_a_crowded_catalogue_moves_exactly_the_excess_once_each():
    from collections import Counter
    from megarec.tokenizer.tree import TreeSnapshot
    g = torch.Generator().manual_seed(0)
    root, leaf = torch.randn(4, 8, generator=g), torch.randn(64, 8, generator=g)
    inc = torch.randn(3000, 3, 8, generator=g) * 0.3
    inc[:, 0] = root[torch.randint(0, 2, (3000,), generator=g)]
    inc[:2000, 1] = leaf[5] + 0.3 * torch.randn(2000, 8, generator=g)    # 2000 items crowd level-2 code 5
    snap = TreeSnapshot(root, leaf, num_levels=3)
    h = inc.cumsum(dim=1)
    before = np.asarray(assign_catalogue(snap, h, [str(i) for i in range(3000)], "none").codes)
    excess = sum(max(0, n - 64) for n in Counter(map(tuple, before[:, :2].tolist())).values())
    cf = assign_catalogue(snap, h, [str(i) for i in range(3000)], "utgrec")
    after = np.asarray(cf.codes)
    assert cf.stats["spill"]["spilled"] == excess > 0
    assert (after[:, 1] != before[:, 1]).sum() == excess               # each spilled item moved once
    assert (after[:, 0] == before[:, 0]).all()
    assert max(Counter(map(tuple, after[:, :2].tolist())).values()) <= 64
    assert collision_rate(after) == 0.0
