"""Render the README's results tables from the run records under docs/results/ (results as data).

    python tools/results_table.py                  # print every table
    python tools/results_table.py --write README.md
    python tools/results_table.py --check README.md   # exit 1 when the README differs from the records

Each README block ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` is the rendering of
``docs/results/NAME/`` (run records written by ``tools/reproduce.py --results docs/results/NAME``,
plus an optional ``published.json``); see :mod:`megarec.results`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarec.results import render_folder, update_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "docs" / "results"), help="folder of the table folders")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="README", help="replace the README's results blocks")
    g.add_argument("--check", metavar="README", help="fail when the README's results blocks differ")
    args = ap.parse_args(argv)
    if not (args.write or args.check):
        for folder in sorted(p for p in Path(args.results).iterdir() if p.is_dir()):
            print(f"## {folder.name}\n\n{render_folder(folder)}\n")
        return 0
    path = Path(args.write or args.check)
    text = path.read_text()
    new = update_readme(text, args.results)
    if args.write:
        path.write_text(new)
        return 0
    if new != text:
        print(f"{path}: results tables differ from {args.results}; run tools/results_table.py --write {path}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
