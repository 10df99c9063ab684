"""Catalogue code assignment: codes for every item, collision handling, statistics.

Two items with the same full ID cannot be told apart by a generative
recommender. Two policies make IDs unique:

- ``utgrec`` (UTGRec Sec. 2.4): the last-level code of colliding items moves to
  the next-nearest *free* code ("the second-nearest or a farther neighbour
  code"), solved for the whole catalogue, never with a random fallback. Items
  sharing a prefix (first L-1 codes) with a collision form a group, and each
  group gets distinct last codes at the least total extra distance: an exact
  min-cost assignment (``scipy.optimize.linear_sum_assignment``) over each
  item's g nearest codes (g = group size, from :func:`megarec.kernels.topk_codes`),
  which provably contain an optimum. A group larger than the last codebook
  cannot be resolved at the last level. For a tokenizer whose levels quantise
  independent inputs (UTGRec's tree: level l quantises its own increment
  ``h_l - h_{l-1}``, whatever the other codes are) the group first spills its
  cheapest-to-move items to their next-nearest level-(L-1) code whose group has
  room (:func:`spill_overflow`, not in the paper: a short pre-training crowds a
  prefix that a long one would not); for any other tokenizer it is a clear error.
- ``dedup`` (TIGER): append a level whose code is the item's index within its
  group of identical IDs; that level's codebook size is the largest group.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from megarec.data.codes import CodesFile
from megarec.data.domain import DataError
from megarec.kernels import topk_codes

POLICIES = ("utgrec", "dedup", "none")


class CollisionError(DataError):
    """Collisions cannot be resolved (a prefix group holds more items than the last codebook has codes)."""


class Tokenizer(Protocol):
    codebook_sizes: list[int]

    def last_level(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def last_codebook(self) -> torch.Tensor: ...


class IndependentLevels(Protocol):
    """A tokenizer whose level-l code is the nearest code of an input of its own (no level reads another's code)."""

    def level_inputs(self, x: torch.Tensor) -> torch.Tensor: ...        # [N, L, d]

    def level_codebook(self, level: int) -> torch.Tensor: ...           # [K_level, d]


# ---------------------------------------------------------------------------- codes
@torch.no_grad()
def catalogue_codes(tokenizer: Tokenizer, x: torch.Tensor, batch_size: int = 4096,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Codes ``[N, L]`` of every row of ``x`` and the vectors the last codebook quantised ``[N, d_c]``, in batches."""
    if x.shape[0] == 0:
        raise DataError("cannot assign codes to an empty catalogue")
    codes, last = zip(*_batches(tokenizer.last_level, x, batch_size, device))
    return torch.cat([c.cpu() for c in codes]).numpy().astype(np.int64), torch.cat([v.float().cpu() for v in last])


def _batches(fn: Any, x: torch.Tensor, batch_size: int, device: str | torch.device | None) -> list[Any]:
    """``fn`` of each batch of rows of ``x`` (moved to ``device`` if given)."""
    return [fn(x[s:s + batch_size].to(device) if device is not None else x[s:s + batch_size])
            for s in range(0, x.shape[0], batch_size)]


def _groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group index per row, size per group) of identical rows; one group when rows have no columns."""
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=np.int64), np.array([len(rows)])
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_rate(codes: np.ndarray) -> float:
    """Fraction of items whose full ID is shared with at least one other item."""
    if len(codes) == 0:
        return 0.0
    inverse, counts = _groups(codes)
    return float((counts[inverse] > 1).mean())


# ----------------------------------------------------------------- utgrec policy
def resolve_collisions(codes: np.ndarray, last_inputs: torch.Tensor, last_codebook: torch.Tensor
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """UTGRec collision handling: unique IDs at the least total extra distance.

    Items sharing a prefix (first L-1 codes) with at least one collision form a group;
    the group's items get distinct last-level codes minimising the summed squared
    distance to their codes (a min-cost assignment, solved exactly). Every other
    item keeps its codes.

    Args:
        codes: ``[N, L]`` codes (last column = nearest code of ``last_inputs`` in ``last_codebook``).
        last_inputs: ``[N, d]`` vectors quantised by the last codebook.
        last_codebook: ``[K, d]``.
    Returns:
        the new codes and ``{"moved", "groups", "extra_distance_mean", "extra_distance_max",
        "moved_distance_before_mean"}`` (extra squared distance of moved items over their
        original code, and their squared distance to the original code for scale).
    Raises:
        CollisionError: a prefix group has more items than the last codebook has codes.
    """
    from scipy.optimize import linear_sum_assignment

    codes = np.array(codes, dtype=np.int64, copy=True)
    C = last_codebook.detach().float().cpu()
    K = C.shape[0]
    info: dict[str, Any] = {"moved": 0, "groups": 0, "extra_distance_mean": 0.0, "extra_distance_max": 0.0}
    full_inv, full_cnt = _groups(codes)
    colliding = full_cnt[full_inv] > 1
    if not colliding.any():
        return codes, info
    prefix_inv, prefix_cnt = _groups(codes[:, :-1])
    bad_groups = np.unique(prefix_inv[colliding])
    too_big = bad_groups[prefix_cnt[bad_groups] > K]
    if len(too_big):
        g = int(too_big[0])
        prefix = tuple(int(c) for c in codes[np.nonzero(prefix_inv == g)[0][0], :-1])
        raise CollisionError(
            f"{int(prefix_cnt[g])} items share the code prefix {prefix} but the last codebook has only {K} codes, "
            f"so their IDs cannot all be unique ({len(too_big)} such group(s)); use a larger last codebook, "
            "more levels, or the 'dedup' collision policy")
    # Every member of a group with a collision takes part (non-colliding members hold codes too).
    in_bad = np.zeros(len(prefix_cnt), dtype=bool)
    in_bad[bad_groups] = True
    items = np.nonzero(in_bad[prefix_inv])[0]
    items = items[np.argsort(prefix_inv[items], kind="stable")]
    x = last_inputs.detach().float().cpu()[torch.from_numpy(items)]
    # In an optimal assignment of g items, each item's code is among its own g nearest
    # (otherwise one of those g codes is free and taking it costs less), so g candidates
    # per item suffice: cost about O(N log N + colliding items * K).
    k = int(min(K, prefix_cnt[bad_groups].max()))
    cand, _ = topk_codes(x, C, k)
    cand = cand.numpy()
    bounds = np.concatenate([[0], np.cumsum(prefix_cnt[bad_groups])])
    new = np.empty(len(items), dtype=np.int64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        g = e - s
        pool = np.unique(cand[s:e, : min(g, K)])
        cost = ((x[s:e, None, :] - C[torch.from_numpy(pool)][None]) ** 2).sum(-1).double().numpy()
        rows, cols = linear_sum_assignment(cost)
        new[s + rows] = pool[cols]
    old = codes[items, -1]
    moved = new != old
    codes[items, -1] = new
    if moved.any():
        xm = x[torch.from_numpy(np.nonzero(moved)[0])]
        before = ((xm - C[torch.from_numpy(old[moved])]) ** 2).sum(1)
        extra = (((xm - C[torch.from_numpy(new[moved])]) ** 2).sum(1) - before).numpy()
        info.update(moved=int(moved.sum()), extra_distance_mean=float(extra.mean()),
                    extra_distance_max=float(extra.max()), moved_distance_before_mean=float(before.mean()))
    info["groups"] = int(len(bad_groups))
    return codes, info


def spill_overflow(codes: np.ndarray, inputs: torch.Tensor, codebook: torch.Tensor, capacity: int,
                   candidates: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Shrink every prefix group (first L-1 codes) to at most ``capacity`` items by moving level L-1.

    Only valid when level L-1's code is the nearest code of ``inputs`` independently of the
    other levels (:class:`IndependentLevels`), so the moved items keep their last-level code and
    input. Moves are taken cheapest first over the whole catalogue (extra squared distance of
    the item's level-(L-1) input to the new code over its current one), each to a code among the
    item's ``candidates`` nearest (default: all) whose group (same first L-2 codes, the new code) still has
    room. Greedy, not an exact min-cost flow: enough to make the last level resolvable with
    small moves (figures in ``info``).

    Args:
        codes: ``[N, L]`` codes, ``L >= 2``.
        inputs: ``[N, d]`` level-(L-1) inputs; ``codebook``: ``[K, d]`` level-(L-1) codebook.
        capacity: the last codebook's size.
    Returns:
        the new codes and ``{"spilled", "overflow_groups", "spill_extra_distance_mean", "spill_extra_distance_max"}``.
    Raises:
        CollisionError: an overflowing group finds no room among its items' candidate codes.
    """
    original = np.asarray(codes, dtype=np.int64)
    codes = original.copy()
    info: dict[str, Any] = {"spilled": 0, "overflow_groups": 0}
    if codes.shape[1] < 2:
        return codes, info
    prefix_inv, prefix_cnt = _groups(codes[:, :-1])
    need = np.maximum(prefix_cnt - capacity, 0)
    if not need.any():
        return codes, info
    size = Counter(map(tuple, codes[:, :-1].tolist()))
    items = np.nonzero(need[prefix_inv] > 0)[0]
    C = codebook.detach().float().cpu()
    x = inputs.detach().float().cpu()[torch.from_numpy(items)]
    cand, dist = topk_codes(x, C, C.shape[0] if candidates is None else min(int(candidates), C.shape[0]))
    current = torch.from_numpy(codes[items, -2])
    here = ((x - C[current]) ** 2).sum(1, keepdim=True)
    extra = (dist - here).numpy()
    cand = cand.numpy()
    order = np.argsort(extra, axis=None, kind="stable")
    moved_extra, moved = [], np.zeros(len(items), dtype=bool)
    left = int(need.sum())
    for flat in order:                     # cheapest (item, code) moves first, each item at most once
        if left == 0:
            break
        r, j = divmod(int(flat), cand.shape[1])
        i, c = items[r], int(cand[r, j])
        g = prefix_inv[i]
        if moved[r] or need[g] == 0 or c == codes[i, -2]:
            continue
        target = (*codes[i, :-2].tolist(), c)
        if size[target] >= capacity:
            continue
        size[tuple(codes[i, :-1].tolist())] -= 1
        size[target] += 1
        codes[i, -2] = c
        need[g] -= 1
        left -= 1
        moved[r] = True
        moved_extra.append(float(extra[r, j]))
    if need.any():
        g = int(np.nonzero(need)[0][0])
        prefix = tuple(int(c) for c in original[np.nonzero(prefix_inv == g)[0][0], :-1])
        raise CollisionError(
            f"{int(prefix_cnt[g])} items share the code prefix {prefix} but the last codebook has only {capacity} "
            f"codes, and {int(need[g])} of them find no prefix with room among their {cand.shape[1]} nearest "
            "codes one level up; use a larger last codebook, more levels, or the 'dedup' collision policy")
    info.update(spilled=len(moved_extra), overflow_groups=int((prefix_cnt > capacity).sum()),
                spill_extra_distance_mean=float(np.mean(moved_extra)), spill_extra_distance_max=float(max(moved_extra)))
    return codes, info


# ------------------------------------------------------------------ dedup policy
def add_dedup_level(codes: np.ndarray, previous: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """TIGER's extra token: each item's index among the items sharing its ID.

    Without ``previous``, indices follow item order. With ``previous [N, L+1]`` (the codes of the last
    assignment, dedup token last), numbering is stable: an item whose first ``L`` codes did not change
    keeps its dedup token, and the items new to a group take the smallest indices free in it (in item
    order), so one item joining or leaving a group renumbers no other item of it (a recommender trained
    on the old tokens keeps its targets). Returns ``(codes [N, L+1], size of the new level = the largest
    index + 1)``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    inverse, counts = _groups(codes)
    if previous is None:
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(len(codes), dtype=np.int64)
        rank[order] = np.arange(len(codes)) - starts[inverse[order]]
    else:
        previous = np.asarray(previous, dtype=np.int64)
        if previous.shape != (codes.shape[0], codes.shape[1] + 1):
            raise ValueError(f"previous codes have shape {previous.shape}, expected {(codes.shape[0], codes.shape[1] + 1)}")
        kept = (previous[:, :-1] == codes).all(axis=1)   # same prefix: same group as before, distinct tokens
        rank = np.where(kept, previous[:, -1], -1)
        used: dict[int, set[int]] = {}
        for i in np.flatnonzero(kept):
            used.setdefault(int(inverse[i]), set()).add(int(rank[i]))
        for i in np.flatnonzero(~kept):          # newcomers: the smallest free token of their group
            taken = used.setdefault(int(inverse[i]), set())
            r = 0
            while r in taken:
                r += 1
            taken.add(r)
            rank[i] = r
    size = int(rank.max()) + 1 if len(rank) else 1
    return np.concatenate([codes, rank[:, None]], axis=1), size


# --------------------------------------------------------------------- statistics
def level_stats(codes: np.ndarray, codebook_sizes: Sequence[int]) -> list[dict[str, float]]:
    """Per level: usage (fraction of codes used), entropy of code frequencies (nats) and perplexity exp(entropy)."""
    out = []
    for level, size in enumerate(codebook_sizes):
        freq = np.bincount(codes[:, level], minlength=size) / max(len(codes), 1)
        nz = freq[freq > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        out.append({"usage": float((freq > 0).sum() / size), "entropy": entropy, "perplexity": math.exp(entropy)})
    return out


def random_collision_rate(num_items: int, codebook_sizes: Sequence[int]) -> float:
    """Expected collision rate of uniformly random IDs: ``1 - (1 - 1/M)^(N-1)``, ``M = prod K_l``."""
    if num_items < 2:
        return 0.0
    log_m = sum(math.log(k) for k in codebook_sizes)
    if log_m == 0:
        return 1.0
    return float(-math.expm1((num_items - 1) * math.log1p(-math.exp(-log_m))))


def duplicate_rate(x: torch.Tensor) -> float:
    """Fraction of rows identical to another row: a floor on any tokenizer's collision rate."""
    _, inverse, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


def key_domains(item_keys: Sequence[str]) -> list[str]:
    """The domain part of each ``"<domain>/<item id>"`` key (the whole key when it has no ``/``)."""
    return [k.split("/", 1)[0] for k in item_keys]


def cross_domain_collision_rate(codes: np.ndarray, item_keys: Sequence[str]) -> float:
    """Fraction of items whose full ID is also held by an item of another domain."""
    if len(codes) == 0:
        return 0.0
    names, domain = np.unique(np.asarray(key_domains(item_keys)), return_inverse=True)
    inverse, counts = _groups(codes)
    lo = np.full(len(counts), len(names), dtype=np.int64)
    hi = np.full(len(counts), -1, dtype=np.int64)
    np.minimum.at(lo, inverse, domain)
    np.maximum.at(hi, inverse, domain)
    return float((lo[inverse] != hi[inverse]).mean())


def check_unique_keys(item_keys: Sequence[str]) -> None:
    """Raise a :class:`DataError` naming the keys that occur more than once."""
    if len(set(item_keys)) != len(item_keys):
        dup = [k for k, n in Counter(item_keys).items() if n > 1]
        raise DataError(f"{len(dup)} item keys occur more than once, e.g. {dup[:5]}; item keys must be unique "
                        "over the catalogue (\"<domain>/<item id>\", domain names distinct)")


def assign_catalogue(tokenizer: Tokenizer, x: torch.Tensor, item_keys: Sequence[str], policy: str = "utgrec",
                     batch_size: int = 4096, device: str | torch.device | None = None,
                     previous: np.ndarray | None = None) -> CodesFile:
    """Codes for every item of ``x [N, in_dim]`` under a collision ``policy``, with statistics in ``stats``.

    ``previous``: the codes of the last assignment of the same catalogue (a regeneration); with the
    ``dedup`` policy an item whose prefix is unchanged keeps its dedup token (:func:`add_dedup_level`).

    Collisions are resolved over the whole of ``x``: for several domains pass all their
    items at once (keys ``"<domain>/<item id>"``) and every item gets a distinct ID;
    ``stats["cross_domain_collision_rate_before"]`` then tells how many items shared an
    ID with another domain's item before resolution.
    """
    if policy not in POLICIES:
        raise ValueError(f"collision policy must be one of {POLICIES}, got {policy!r}")
    if len(item_keys) != x.shape[0]:
        raise DataError(f"{len(item_keys)} item keys for {x.shape[0]} input rows")
    check_unique_keys(item_keys)
    codes, last = catalogue_codes(tokenizer, x, batch_size, device)
    sizes = [int(k) for k in tokenizer.codebook_sizes]
    before = collision_rate(codes)
    stats: dict[str, Any] = {
        "num_items": int(len(codes)), "policy": policy, "collision_rate_before": before,
        "random_codes_collision_rate": random_collision_rate(len(codes), sizes),
        "duplicate_input_rate": duplicate_rate(x.float().cpu()),
        "levels_before": level_stats(codes, sizes),
    }
    if len(set(key_domains(item_keys))) > 1:
        stats["cross_domain_collision_rate_before"] = cross_domain_collision_rate(codes, item_keys)
    if policy == "utgrec":
        if hasattr(tokenizer, "level_inputs") and len(sizes) >= 2 and _groups(codes[:, :-1])[1].max() > sizes[-1]:
            inputs = torch.cat([h[:, -2].float().cpu() for h in _batches(tokenizer.level_inputs, x, batch_size, device)])
            codes, stats["spill"] = spill_overflow(codes, inputs, tokenizer.level_codebook(len(sizes) - 2), sizes[-1])
        codes, stats["resolution"] = resolve_collisions(codes, last, tokenizer.last_codebook())
    elif policy == "dedup":
        codes, extra = add_dedup_level(codes, previous)
        sizes.append(extra)
    stats["collision_rate_after"] = collision_rate(codes)
    stats["levels"] = level_stats(codes, sizes)
    return CodesFile(list(item_keys), codes, sizes, dedup_level=policy == "dedup", stats=stats)
