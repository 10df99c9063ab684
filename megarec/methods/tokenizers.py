"""Item tokenizers as plug-ins, like the recommender methods (:mod:`megarec.methods`).

``TOKENIZERS`` maps a tokenizer name to ``"module:Class"`` of a :class:`TokenizerPlugin`;
``megarec train-tokenizer --method NAME`` and ``train_tokenizer.py`` (``method:`` of its config)
dispatch through :func:`get_tokenizer` and never test a name. A plug-in that trains under the
DeepSpeed launcher declares ``config_cls`` (its run config: YAML + ``--key value``) and
``run(cfg)``; every plug-in implements ``run_cli`` for the ``megarec train-tokenizer`` form
(``PATH... --out DIR``). Plug-ins are named by string, so this module imports none of them.
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Any, ClassVar

TOKENIZERS: dict[str, str] = {
    "rqvae": "megarec.methods.rqvae_tokenizer:RQVAETokenizer",
    "utgrec": "megarec.methods.utgrec.tokenizer_plugin:UTGRecTokenizer",
}

DEFAULT_CLI_TOKENIZER = "rqvae"      # `megarec train-tokenizer PATH --out DIR` with no --method
DEFAULT_SCRIPT_TOKENIZER = "utgrec"  # `train_tokenizer.py --config FILE` whose config names no method


class TokenizerPlugin:
    """Base class of a tokenizer plug-in."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type | None] = None   # run config of train_tokenizer.py (None: not launchable)

    def run(self, cfg: Any) -> dict[str, Any]:
        """Train (collective under a launcher), export weights and codes; the run's result (with ``method``)."""
        raise NotImplementedError

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        """The one-line JSON summary train_tokenizer.py prints."""
        return result

    def cli_overrides(self, args: argparse.Namespace) -> list[tuple[str, str]]:
        """The run-config keys that ``megarec train-tokenizer PATH... --out DIR`` sets (launchable plug-ins)."""
        raise NotImplementedError

    def run_cli(self, args: argparse.Namespace) -> int:
        """``megarec train-tokenizer PATH... --out DIR [--key value ...]`` (``args.overrides``); exit code."""
        raise NotImplementedError


@lru_cache(maxsize=None)
def get_tokenizer(name: str) -> TokenizerPlugin:
    """The registered tokenizer ``name``."""
    from megarec.methods import load_plugin

    return load_plugin(TOKENIZERS, name, "tokenizer")


def tokenizer_names() -> tuple[str, ...]:
    return tuple(TOKENIZERS)
