"""Write the embedded sample (megarec/data/sample/<D>/) from the real Amazon domains.

    python tools/make_sample.py [--src /work/shared/data/amazon] [--users 300] [--items 500]

For each domain: keep the interactions with its ``--items`` most popular items
(so the few hundred sampled users share items and a recommender has something
to learn), keep users left with at least ``--min-len`` interactions, pick
``--users`` of them with a seeded generator, re-index the items 0..n-1 and
write the json layout (``<D>.inter.json`` + ``<D>.item.json``). Order inside
each sequence is unchanged. Long text fields are cut to ``--max-chars`` at a
word boundary to keep the package small.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megarec.data.domain import Domain
from megarec.data.readers import read_domain
from megarec.data.readers.json_layout import write

DOMAINS = ("Scientific", "Office", "Games")
OUT = Path(__file__).resolve().parents[1] / "megarec" / "data" / "sample"


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at the last space when there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]  # a space right after the limit still ends a whole word
    return cut[: cut.rfind(" ")].rstrip() if " " in cut else text[:max_chars]


def subsample(domain: Domain, *, users: int, items: int, min_len: int = 5, seed: int = 0,
              max_chars: int = 300) -> Domain:
    """A small real subset of ``domain`` (see the module docstring); deterministic for a seed."""
    counts = np.bincount(np.concatenate(domain.sequences), minlength=domain.num_items)
    popular = np.argsort(-counts, kind="stable")[:items]
    keep_item = np.zeros(domain.num_items, dtype=bool)
    keep_item[popular] = True
    seqs = [s[keep_item[s]] for s in domain.sequences]
    eligible = np.flatnonzero([len(s) >= min_len for s in seqs])
    if len(eligible) < users:
        raise ValueError(f"{domain.name}: only {len(eligible)} users have >= {min_len} interactions "
                         f"with the {items} most popular items; asked for {users}")
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    restricted = Domain(domain.name, domain.item_ids, domain.users, seqs, domain.item_text, domain.item_image,
                        domain.source, domain.text_fields)
    sub = restricted.subset_users(chosen.tolist())
    sub.item_ids = [str(i) for i in range(sub.num_items)]
    if sub.item_text is not None:
        sub.item_text = [{k: truncate(v, max_chars) for k, v in rec.items()} for rec in sub.item_text]
    return sub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="/work/shared/data/amazon", help="folder holding <D>/<D>.inter.json")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--min-len", type=int, default=5)
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    total = 0
    for name in args.domains.split(","):
        sub = subsample(read_domain(Path(args.src) / name), users=args.users, items=args.items,
                        min_len=args.min_len, seed=args.seed, max_chars=args.max_chars)
        inter = write(sub, Path(args.out) / name)
        size = sum(p.stat().st_size for p in inter.parent.glob("*.json"))
        total += size
        st = sub.stats()
        print(f"{name}: {st['users']} users, {st['items']} items, {st['interactions']} interactions, "
              f"avg len {st['avg_len']:.2f}, {size / 1024:.0f} KiB")
    print(f"total {total / 1024:.0f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
