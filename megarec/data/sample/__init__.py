"""The embedded multi-domain sample: small real subsets of three Amazon domains.

Scientific, Office and Games (300 users each, items re-indexed, json layout;
item text but no images), written by ``tools/make_sample.py`` from the data
described in its docstring. Used by ``megarec quickstart``, demos and tests.
"""
from __future__ import annotations

from pathlib import Path

from megarec.data.domain import Domain

SAMPLE_DIR = Path(__file__).resolve().parent
DOMAINS = ("Scientific", "Office", "Games")


def sample_paths() -> list[Path]:
    """The sample's domain folders, in the order of ``DOMAINS``."""
    paths = [SAMPLE_DIR / d for d in DOMAINS]
    missing = [p for p in paths if not (p / f"{p.name}.inter.json").is_file()]
    if missing:
        raise FileNotFoundError(f"embedded sample incomplete, missing {missing[0]}; "
                                "regenerate it with tools/make_sample.py")
    return paths


def load_sample() -> list[Domain]:
    """The sample's domains, read with :func:`megarec.data.readers.read_domain`."""
    from megarec.data.readers import read_domain

    return [read_domain(p) for p in sample_paths()]
