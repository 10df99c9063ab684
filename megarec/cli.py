"""``megarec <command>``: every user-facing step.

Each command is a ``_cmd_<name>(args)`` function plus a ``_add_<name>(sub)``
that declares its arguments; ``COMMANDS`` lists them in the order ``--help``
shows. Heavy imports happen inside the commands so ``megarec --help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from megarec.data.domain import DataError
from megarec.config import ConfigError


# --------------------------------------------------------------------------- stats
def _add_stats(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="per-domain users, items, interactions, avg length, sparsity",
                       description="Print the papers' Table 1 statistics for each domain, as read "
                                   "(k-core filtering only where asked for).")
    p.add_argument("paths", nargs="+", help="domain folders or files (any supported format)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    p.add_argument("--kcore", type=int, default=None,
                   help="apply k-core filtering first (default: none, except 5 for raw Amazon 2023)")
    return p


def _cmd_stats(args: argparse.Namespace) -> int:
    from megarec.data.readers import read_domain

    rows = [read_domain(p, kcore=args.kcore).stats() for p in args.paths]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["domain", "users", "items", "interactions", "avg_len", "sparsity"]))
    return 0


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table; floats to 4 decimals, ints with thousands separators."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


COMMANDS: list[tuple[Callable, Callable]] = [
    (_add_stats, _cmd_stats),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarec", description="MegaRec: generative recommendation with semantic IDs")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add, run in COMMANDS:
        p = add(sub)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (DataError, ConfigError) as e:
        print(f"megarec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
