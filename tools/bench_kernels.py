#!/usr/bin/env python
"""Time and peak memory of the fused ops vs their naive formulas.

    python tools/bench_kernels.py [--quick] --json FILE [--device cpu|cuda]

- assignment: ``nearest_code(x, C)`` vs ``torch.cdist(x, C).argmin(1)``
- InfoNCE (forward + backward, two directions, tau = 0.07): ``infonce(a, b)`` vs the
  full B x B logits + ``F.cross_entropy`` in both directions.

Each case runs in a fresh subprocess. Peak memory is the extra memory the op needs
beyond its inputs: on CPU the growth of the process's peak RSS (``ru_maxrss``)
during the first call, measured after the inputs are allocated and touched (torch's
CPU allocations are invisible to tracemalloc); on CUDA ``torch.cuda.max_memory_allocated``
minus the memory allocated before the call. Times come from one more process
that calls fused and naive alternately (so load from other processes hits both
alike) and keeps the best of each (repeats stop after ~20 s per shape; on CUDA
after a warm-up call that compiles the kernels). Naive cases whose estimated
memory exceeds ``--mem-limit-gb`` are skipped and marked so in the table; the
fused case then reports its first (memory-run) call as its time.

The JSON holds every row and a ``summary``: ``infonce_mem_ratio`` (fused / naive
peak at B = 16,384), ``infonce_time_ratio`` (fused / naive time at B = 16,384) and
``assign_time_ratio`` (fused / naive time, the worst over the assignment cases).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

GIB = 1 << 30
TAU = 0.07
SUMMARY_B = 16384
_TIME_BUDGET_S = 20.0  # stop repeating a case once its timed calls took this long

FULL = {
    "assign": [(n, k, d) for n in (100_000, 1_000_000) for k in (256, 512) for d in (32, 128)],
    "infonce": [4096, 16384, 65536],
    "repeats": 3,
}
QUICK = {  # the summary's shapes only: every shape costs three fresh processes
    "assign": [(100_000, 256, 32), (100_000, 512, 128)],
    "infonce": [SUMMARY_B],
    "repeats": 2,
}


def _naive_bytes(case: dict) -> int:
    """Rough peak of the naive formula: the N x K (or B x B) fp32 matrix times its live copies."""
    if case["op"] == "assign":
        return 3 * case["n"] * case["k"] * 4
    return 5 * case["b"] ** 2 * 4  # logits, 2 log-softmax outputs, their grads


# --------------------------------------------------------------------------- subprocess side
def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make(case: dict):
    """Inputs for ``case`` and ``{impl: (fn, backend)}``; ``fn()`` runs the op once."""
    import torch
    import torch.nn.functional as F

    from megarec.kernels import infonce, nearest_code
    from megarec.kernels._dispatch import resolve_backend

    dev = case["device"]
    torch.manual_seed(0)
    if case["op"] == "assign":
        x = torch.randn(case["n"], case["d"], device=dev)
        C = torch.randn(case["k"], case["d"], device=dev)
        return {"fused": (lambda: nearest_code(x, C), resolve_backend("auto", x, C)),
                "naive": (lambda: torch.cdist(x, C).argmin(1), "torch")}
    a = torch.randn(case["b"], case["d"], device=dev, requires_grad=True)
    b = torch.randn(case["b"], case["d"], device=dev, requires_grad=True)

    def naive():
        an, bn = F.normalize(a, dim=1, eps=1e-8), F.normalize(b, dim=1, eps=1e-8)
        S = an @ bn.t() / TAU
        t = torch.arange(a.shape[0], device=dev)
        return F.cross_entropy(S, t) + F.cross_entropy(S.t(), t)

    def step(loss_fn):
        loss_fn().backward()
        a.grad = b.grad = None

    return {"fused": (lambda: step(lambda: infonce(a, b, TAU)), resolve_backend("auto", a, b)),
            "naive": (lambda: step(naive), "torch")}


def _sync(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory(case: dict) -> dict:
    """Extra peak memory of the first call of one implementation (and that call's time)."""
    import torch

    dev = case["device"]
    fn, backend = _make(case)[case["impl"]]
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda" else _peak_rss_bytes()) - base
    return {"peak_mib": peak / (1 << 20), "first_s": first, "backend": backend}


def _times(case: dict) -> dict:
    """Best time of each implementation, calling them alternately so that load from other
    processes on the machine hits both alike."""
    dev = case["device"]
    fns = _make(case)
    if dev == "cuda":  # compile the kernels, warm the allocator
        for impl in case["impls"]:
            fns[impl][0]()
    best = {impl: float("inf") for impl in case["impls"]}
    spent = 0.0
    for rep in range(case["repeats"]):
        if rep and spent > _TIME_BUDGET_S:
            break
        for impl in case["impls"]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[impl][0]()
            _sync(dev)
            dt = time.perf_counter() - t0
            best[impl] = min(best[impl], dt)
            spent += dt
    return best


# --------------------------------------------------------------------------- driver
def _shapes(cfg: dict) -> list[dict]:
    out = [{"op": "assign", "n": n, "k": k, "d": d, "shape": f"N={n:,} K={k} d={d}"} for n, k, d in cfg["assign"]]
    out += [{"op": "infonce", "b": b, "d": 128, "shape": f"B={b:,} d=128"} for b in cfg["infonce"]]
    return out


def _spawn(mode: str, case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, __file__, "--_run", mode, json.dumps(case)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _bench_shape(shape: dict, device: str, repeats: int, mem_limit_gb: float) -> list[dict]:
    """Memory of each implementation in its own fresh process, then their times side by side."""
    base = {**shape, "device": device, "repeats": repeats}
    rows = {impl: {**base, "impl": impl} for impl in ("fused", "naive")}
    need = _naive_bytes(shape)
    if need > mem_limit_gb * GIB:
        rows["naive"]["note"] = f"skipped: needs ~{need / GIB:.0f} GiB > {mem_limit_gb:g} GiB"
    impls = [i for i in ("fused", "naive") if "note" not in rows[i]]
    for impl in impls:
        rows[impl].update(_spawn("memory", rows[impl]))
    ok = [i for i in impls if "error" not in rows[i]]
    if len(ok) == 2:
        times = _spawn("times", {**base, "impls": ok})
        for impl in ok:
            if "error" in times:
                rows[impl]["error"] = times["error"]
            rows[impl]["time_s"] = times.get(impl)
    for impl in ok:  # a lone implementation: its first call is its time (only on CPU, no compile there)
        if rows[impl].get("time_s") is None and device == "cpu":
            rows[impl]["time_s"] = rows[impl]["first_s"]
    f, n = rows["fused"], rows["naive"]
    if f.get("time_s") and n.get("time_s"):
        f["time_ratio"] = f["time_s"] / n["time_s"]
        f["mem_ratio"] = f["peak_mib"] / n["peak_mib"] if n["peak_mib"] > 0 else None
    return [f, n]


def _summary(rows: list[dict]) -> dict:
    fused = [r for r in rows if r["impl"] == "fused" and r.get("time_ratio") is not None]
    out: dict = {}
    at = next((r for r in fused if r["op"] == "infonce" and r["b"] == SUMMARY_B), None)
    if at:
        out["infonce_mem_ratio"] = at["mem_ratio"]
        out["infonce_time_ratio"] = at["time_ratio"]
    assign = [r["time_ratio"] for r in fused if r["op"] == "assign"]
    if assign:
        out["assign_time_ratio"] = max(assign)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (under a minute on CPU)")
    p.add_argument("--json", help="write the rows and summary here (required)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="skip naive cases estimated above this")
    p.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._run:
        mode, case = args._run
        print(json.dumps((_memory if mode == "memory" else _times)(json.loads(case))))
        return 0
    if not args.json:
        p.error("--json FILE is required")

    from megarec.formatting import format_table

    rows = []
    cfg = QUICK if args.quick else FULL
    for shape in _shapes(cfg):
        for row in _bench_shape(shape, args.device, cfg["repeats"], args.mem_limit_gb):
            rows.append(row)
            print(f"  {row['op']:8s} {row['impl']:5s} {row['shape']:28s} "
                  + (f"{row['time_s']:.4f} s  {row['peak_mib']:.1f} MiB" if row.get("time_s") is not None
                     else row.get("note", row.get("error", ""))), file=sys.stderr, flush=True)
    summary = _summary(rows)
    table = [{**r, "note": r.get("note", r.get("error", ""))} for r in rows]
    print(format_table(table, ["op", "shape", "impl", "backend", "time_s", "peak_mib", "time_ratio", "mem_ratio",
                               "note"]))
    print("summary: " + json.dumps(summary))
    import torch

    meta = {"device": args.device, "quick": args.quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "tau": TAU,
            "memory_method": ("cuda.max_memory_allocated" if args.device == "cuda"
                              else "ru_maxrss growth, fresh process")}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=2)
    return 0


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    sys.exit(main())
