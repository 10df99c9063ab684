"""DeepSpeed entry point: train an item tokenizer (any registered tokenizer plug-in with a run config).

    deepspeed megarec/train_tokenizer.py --deepspeed ds_configs/zero3.json --config FILE [--key value ...]
    python megarec/train_tokenizer.py --config FILE [--key value ...]     # one process, no launcher
    megarec train-tokenizer SHARDS --method utgrec --out RUN [--key value ...]

The config's ``method`` (or ``--method``; default ``utgrec``) names the plug-in
(:mod:`megarec.methods.tokenizers`), which declares the config class and runs the training
and the code export: e.g. UTGRec's universal tokenizer from item shards
(:mod:`megarec.methods.utgrec.tokenizer_run`). This file never tests a tokenizer's name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":
    from megarec.entry_point import unshadow_script_dir

    unshadow_script_dir(__file__)

import yaml


def build_arg_parser() -> argparse.ArgumentParser:
    from megarec.entry_point import script_arg_parser

    return script_arg_parser("train_tokenizer.py", __doc__.split("\n\n")[0],
                             "Any config key can be overridden: --train.lr 1e-4 --utgrec.loss.alpha 5",
                             "YAML config of the tokenizer plug-in (its `method` key names it)",
                             "pre-trained tokenizer to start from (sets train.init_from)")


def _plugin(config: str | None, overrides: Sequence[tuple[str, str]]):
    """The plug-in named by ``--method``, else by the config file's ``method``, else the default."""
    from megarec.methods.tokenizers import DEFAULT_SCRIPT_TOKENIZER, get_tokenizer

    name = dict(overrides).get("method")
    if name is None and config:
        from megarec.config import ConfigError

        try:
            name = (yaml.safe_load(Path(config).read_text()) or {}).get("method")
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {config}: {e}") from e
    return get_tokenizer(name or DEFAULT_SCRIPT_TOKENIZER)


def parse_args(argv: Sequence[str] | None = None) -> Any:
    from megarec.config import ConfigError, load_config
    from megarec.entry_point import script_overrides

    args, rest = build_arg_parser().parse_known_args(argv)
    overrides = script_overrides(args, rest)
    plugin = _plugin(args.config, overrides)
    if plugin.config_cls is None:
        raise ConfigError(f"tokenizer {plugin.name!r} trains in one process, not under train_tokenizer.py: "
                          f"`megarec train-tokenizer PATH... --method {plugin.name} --out DIR`")
    return load_config(plugin.config_cls, args.config, overrides)


def run(cfg: Any) -> dict[str, Any]:
    from megarec.methods.tokenizers import get_tokenizer

    return get_tokenizer(cfg.method).run(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    from megarec.entry_point import script_main
    from megarec.methods.tokenizers import get_tokenizer

    return script_main("train_tokenizer", parse_args, run, lambda r: get_tokenizer(r["method"]).summary(r), argv)


if __name__ == "__main__":
    from megarec.engine.preemption import install_from_env

    install_from_env()   # under slurm/: SIGUSR1 / SIGTERM -> checkpoint at the next step, exit 75
    sys.exit(main())
