"""UTGRec's universal tokenizer as a plug-in of ``train_tokenizer.py`` / ``megarec train-tokenizer --method utgrec``:
its run config (:class:`~megarec.methods.utgrec.tokenizer_config.TrainTokenizerConfig`) and run
(:func:`~megarec.methods.utgrec.tokenizer_run.run`)."""
from __future__ import annotations

import argparse
from typing import Any

from megarec.config import ConfigError
from megarec.methods.tokenizers import TokenizerPlugin
from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig


class UTGRecTokenizer(TokenizerPlugin):
    name = "utgrec"
    config_cls = TrainTokenizerConfig

    def run(self, cfg: TrainTokenizerConfig) -> dict[str, Any]:
        from megarec.methods.utgrec.tokenizer_run import run

        return run(cfg)

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"global_step": result["global_step"], "train_s": round(result["train_s"], 2),
                "heldout_collision_rate": result["heldout_collision_rate"]}

    def cli_overrides(self, args: argparse.Namespace) -> list[tuple[str, str]]:
        """``PATH`` is the item shard folder (`megarec build-shards`), ``--out`` the run folder."""
        if len(args.paths) != 1:
            raise ConfigError("--method utgrec takes one PATH: the item shard folder (`megarec build-shards`)")
        return [("data.shards", str(args.paths[0])), ("train.run_dir", str(args.out))]
