"""What ZeRO-3 allocates on a CPU rank, phase by phase, per trainable parameter: the measurements behind
:func:`megarec.engine.memory_model.predict_load` and :func:`~megarec.engine.memory_model.export_transient`.

A model of one trainable ``Linear`` (``--trainable`` elements) and frozen ``Linear`` layers (``--frozen``
elements), built under ``deepspeed.zero.Init`` in bf16 at 1 and 2 CPU ranks (``ds_configs/zero3.json``),
then ``deepspeed.initialize``, two optimizer steps and :func:`megarec.engine.checkpoint.gather_state_dict`
of the trainable weights. A thread samples the rank's resident memory every 2 ms; per phase the table gives
the rise of the phase's peak over the resident memory before it, in bytes per trainable element (per the
rank's share ``T / N`` for the partitioned phases, per full ``T`` for the export):

    python tools/probe_zero3_memory.py --json /tmp/probe.json

Measured on a 2-core AMD EPYC (AVX512-BF16), 67M trainable + 134M frozen, in one piece and in 4
(``docs/results/scale/zero3_probe.json``, ``zero3_probe_4pieces.json``): ``deepspeed.initialize`` keeps
6 bytes per ``T / N`` (the fp32 master 4 and the gradient partition in the training dtype, 2 in bf16) plus
both reduce buckets (~0.19 GB) and passes through an fp32 copy of the largest trainable parameter (4 bytes
per its element); the first step adds Adam's two moments (8 per ``T / N``); the export passes through ~8
bytes per element of the largest trainable parameter on every rank (its full fp32 copy and the
all-reduce's buffer of the same size: DeepSpeed rebuilds a partitioned fp32 master by all-reduce), plus
the gathered state on rank 0 (in 4 pieces at 2 ranks: 5.9 bytes per ``T`` on rank 0, 3.0 on rank 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakSampler:
    """Resident memory sampled on a thread; :meth:`phase` returns a phase's (start, peak) in bytes."""

    def __init__(self, period_s: float = 0.002) -> None:
        from megarec.engine.memory_model import GB, host_resident_gb

        self._read = lambda: host_resident_gb() * GB
        self._peak = self._read()
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read())
            time.sleep(self._period)

    def phase(self, fn):
        start = self._read()
        self._peak = start
        out = fn()
        time.sleep(5 * self._period)
        return out, start, max(self._peak, self._read())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def rank_main(trainable: int, frozen: int, pieces: int, out: Path) -> None:
    """One rank's measurements (run under the deepspeed launcher), written as ``out/rank{r}.json``."""
    import deepspeed
    import torch
    from torch import nn

    from megarec.distributed import is_main_process
    from megarec.engine.checkpoint import gather_state_dict
    from megarec.engine.deepspeed_setup import build_engine, init_distributed, resolve_ds_config
    from megarec.engine.memory_model import release_free_heap

    torch.set_num_threads(1)
    init_distributed()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["bf16"] = {"enabled": True}
    cfg = resolve_ds_config(cfg, micro_batch_size=1, lr=1e-4, weight_decay=0.0)   # the trainers' path
    side = int((trainable / pieces) ** 0.5)
    n_frozen = max(1, round(frozen / side ** 2))
    sampler = PeakSampler()
    phases: dict[str, tuple[float, float]] = {}

    def build() -> nn.Module:
        with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16):
            model = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(n_frozen + pieces)])
        for layer in model[pieces:]:
            layer.requires_grad_(False)
        release_free_heap()
        return model

    model, *phases["build"] = sampler.phase(build)

    def init():
        engine = build_engine(model, cfg)            # trims the freed heap itself
        return engine

    engine, *phases["initialize"] = sampler.phase(init)
    x = torch.randn(4, side, dtype=torch.bfloat16)

    def step():
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()

    for i in range(2):
        _, *phases[f"step{i + 1}"] = sampler.phase(step)
    state, *phases["export"] = sampler.phase(lambda: gather_state_dict(engine.module, [f"{i}.weight" for i in range(pieces)]))
    sampler.close()
    t = pieces * side * side
    per = {"build": None, "initialize": t / world, "step1": t / world, "step2": t / world, "export": t}
    rows = {k: {"start_gb": round(a / 2**30, 3), "peak_gb": round(b / 2**30, 3),
                "bytes_per_element": None if per[k] is None else round((b - a) / per[k], 2)}
            for k, (a, b) in phases.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "trainable": t, "pieces": pieces, "frozen": n_frozen * side * side,
         "holds_state": is_main_process() and bool(state), "phases": rows}))


def launch(world: int, trainable: int, frozen: int, pieces: int, out: Path, timeout: float = 900) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(29750 + world), __file__, "--rank-main",
           "--trainable", str(trainable), "--frozen", str(frozen), "--pieces", str(pieces), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"probe at {world} ranks: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| ranks | rank | phase | start GB | peak GB | bytes per element |", "|---|---|---|---|---|---|"]
    for world, ranks in results.items():
        for r in ranks:
            for name, p in r["phases"].items():
                b = "-" if p["bytes_per_element"] is None else f"{p['bytes_per_element']:.2f}"
                rows.append(f"| {world} | {r['rank']} | {name} | {p['start_gb']:.3f} | {p['peak_gb']:.3f} | {b} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainable", type=int, default=8192 ** 2, help="elements of the trainable Linear")
    ap.add_argument("--frozen", type=int, default=2 * 8192 ** 2, help="elements of the frozen Linears")
    ap.add_argument("--pieces", type=int, default=1, help="split the trainable elements over this many Linears")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--json", default="")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_main:
        rank_main(args.trainable, args.frozen, args.pieces, Path(args.out))
        return {}
    results: dict[str, list[dict]] = {}
    for world in (int(w) for w in args.ranks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            results[str(world)] = launch(world, args.trainable, args.frozen, args.pieces, Path(tmp))
    print(table(results))
    if args.json:
        from megarec.results import commit_of

        command = " ".join(["python", "tools/probe_zero3_memory.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.json).write_text(json.dumps({"trainable": args.trainable, "frozen": args.frozen,
                                               "pieces": args.pieces, "command": command, **commit_of(Path(__file__)),
                                               "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
