"""DeepSpeed entry point: train and evaluate a recommender (any registered method).

    deepspeed megarec/train_rec.py --deepspeed ds_configs/zero3.json --config FILE [--key value ...]
    python megarec/train_rec.py --config FILE [--key value ...]     # one process, no launcher
    megarec train-rec --config FILE [--key value ...]               # the same, from the CLI

Reads every domain of ``data.paths`` (several domains = multi-domain training in
one shared item / code space), checks the codes file against the data, builds the
method's model (``--init_from`` loads weights to fine-tune), trains with AdamW and
warmup + cosine under DeepSpeed, evaluates every ``train.eval_every`` epochs,
stops early on validation NDCG@10, tests the best model and writes under
``train.run_dir``: ``config.yaml``, ``checkpoints/`` (``--resume`` continues from the
latest), ``model/`` (``model.safetensors`` + ``config.yaml`` [+ ``codes.safetensors``]),
``tb/`` and ``metrics.json``. The method is a plug-in (:mod:`megarec.methods`): this
file never tests its name; the run itself is :func:`megarec.methods.training.run`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

if __name__ == "__main__":
    from megarec.entry_point import unshadow_script_dir

    unshadow_script_dir(__file__)

from megarec.config import load_config
from megarec.methods.training import TrainRecConfig, profile_layer

# --------------------------------------------------------------------------- command line
def build_arg_parser() -> argparse.ArgumentParser:
    from megarec.entry_point import script_arg_parser

    p = script_arg_parser("train_rec.py", __doc__.split("\n\n")[0],
                          "Any config key can be overridden: --train.lr 3e-3 --data.paths a,b",
                          "YAML config (TrainRecConfig); keys not given keep defaults",
                          "weights to fine-tune from (sets train.init_from)")
    p.add_argument("--profile", default=None, help="preset of the method (megarec/configs/<method>/<profile>.yaml): "
                                                   "paper, cpu-small, quickstart, tiny; below --config and overrides")
    return p


def parse_args(argv: Sequence[str] | None = None) -> Any:
    from megarec.entry_point import script_overrides

    args, rest = build_arg_parser().parse_known_args(argv)
    overrides = script_overrides(args, rest)
    base = []
    if args.profile:
        # the profile belongs to the method the run will have: the command line's, else the file's
        method = dict(overrides).get("method")
        if method is None:
            method = load_config(TrainRecConfig, args.config).method
        base.append(profile_layer(method, args.profile))
    return load_config(TrainRecConfig, args.config, overrides, base=base)


def main(argv: Sequence[str] | None = None) -> int:
    from megarec.entry_point import script_main

    from megarec.methods.training import run

    return script_main("train_rec", parse_args, run, lambda r: {
        "test": r["test"], "best_epoch": r["best_epoch"], "train_s": round(r["train_s"], 2)}, argv)


if __name__ == "__main__":
    from megarec.engine.preemption import install_from_env

    install_from_env()   # under slurm/: SIGUSR1 / SIGTERM -> checkpoint at the next step, exit 75
    sys.exit(main())
