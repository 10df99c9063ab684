"""device_check.sh step 4: UTGRec's tokenizer at Qwen2-VL-2B's configuration on one GPU.

    DS_ACCELERATOR=cuda python tools/device_utgrec.py [--steps 10] [--batch 16]

``random_init`` (no download), bf16 (``ds_configs/zero3.json`` resolves ``"auto"`` to bf16 on a GPU that
has it), ZeRO-3 on the one rank, gradient checkpointing, cached VAE latents, 64 items with 500 px
placeholder JPEGs and their co-occurrence positives. Prints and writes ``$OUT/utgrec_2b.json``: median
samples/s, MFU (``perf/mfu``, the peak from the GPU's name), step seconds, peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def main(argv: list[str] | None = None) -> dict:
    import scale_tokenizer as st

    from megarec.config import load_config
    from megarec.methods.utgrec.tokenizer_config import TrainTokenizerConfig
    from megarec.methods.utgrec.tokenizer_run import run
    from tests.dist import tb_scalars

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", default="/tmp/utgrec_2b")
    ap.add_argument("--size", default="paper", choices=("paper", "quick", "tiny"), help="tiny: a CPU smoke run")
    args = ap.parse_args(argv)
    work = Path(args.work)
    s = dict(st.sizes(args.size), items=64, steps=args.steps, batch=args.batch)
    qwen, vae, shards = st.prepare(work, s)
    flat = st.overrides(qwen, vae, shards, s, work / "run") + ["--train.log_every", "5", "--data.num_workers", "4",
                                                               "--train.cpu_threads", "0"]
    pairs = [(flat[i][2:], flat[i + 1]) for i in range(0, len(flat), 2)]
    cfg = load_config(TrainTokenizerConfig, REPO / "megarec" / "configs" / "utgrec_tokenizer_paper.yaml", pairs)
    metrics = run(cfg)

    def median(tag: str) -> float | None:
        got = tb_scalars(work / "run" / "tb", tag)
        return round(statistics.median(got.values()), 4) if got else None

    out = {"samples_per_s": median("perf/samples_per_s"), "mfu": median("perf/mfu"), "step_s": median("perf/step_s"),
           "device_peak_gb": metrics["memory"]["device_peak_gb"], "parameters": metrics["memory"]["parameters"],
           "steps": args.steps, "batch": args.batch}
    dest = Path(os.environ.get("OUT", "runs/device_check"))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "utgrec_2b.json").write_text(json.dumps(out, indent=2))
    print(out)
    return out


if __name__ == "__main__":
    main()
