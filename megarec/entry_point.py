"""What the training scripts (``train_rec.py``, ``train_tokenizer.py``) share: their common options, and
``main`` (parse, run, print a one-line JSON summary on the main process; a configuration or data error is
one clear line and exit 2)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence


def unshadow_script_dir(script: str) -> None:
    """Run as a file (``deepspeed megarec/train_rec.py``), Python puts ``megarec/`` first on ``sys.path``, where
    ``megarec/kernels`` shadows the ``kernels`` package that transformers imports: put the repository root
    there instead. Call before anything imports transformers (this module imports nothing heavy)."""
    from pathlib import Path

    here = Path(script).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        sys.path[0] = str(here.parent)


def script_arg_parser(prog: str, description: str, epilog: str, config_help: str,
                      init_from_help: str) -> argparse.ArgumentParser:
    """``--config``, ``--deepspeed``, ``--resume``, ``--init_from`` and the deepspeed launcher's ``--local_rank``;
    any other ``--key value`` is a config override (:func:`script_overrides`)."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (sets train.deepspeed)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.run_dir")
    p.add_argument("--init_from", default=None, help=init_from_help)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def script_overrides(args: argparse.Namespace, rest: Sequence[str]) -> list[tuple[str, str]]:
    """The ``--key value`` overrides of ``rest``, then ``--deepspeed`` / ``--resume`` / ``--init_from`` as the
    ``train.*`` keys they set."""
    from megarec.config import parse_overrides

    overrides = parse_overrides(list(rest))
    if args.deepspeed:
        overrides.append(("train.deepspeed", args.deepspeed))
    if args.resume:
        overrides.append(("train.resume", "true"))
    if args.init_from:
        overrides.append(("train.init_from", args.init_from))
    return overrides


def script_main(prog: str, parse_args: Callable[[Sequence[str] | None], Any], run: Callable[[Any], dict],
                summary: Callable[[dict], dict], argv: Sequence[str] | None = None) -> int:
    from megarec.config import ConfigError
    from megarec.data.domain import DataError
    from megarec.distributed import is_main_process

    try:
        result = run(parse_args(argv))
    except (ConfigError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if is_main_process():
        print(json.dumps(summary(result)))
    return 0
