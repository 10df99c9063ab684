"""The shared ``main`` of the training scripts (``train_rec.py``, ``train_tokenizer.py``): parse, run, print
a one-line JSON summary on the main process; a configuration or data error is one clear line and exit 2."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence


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
