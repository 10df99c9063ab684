"""The tokenizer part of ``tools/bench_scale.py``: UTGRec's tokenizer at Qwen2-VL-2B's exact configuration
(``random_init``: no download) through ``megarec/train_tokenizer.py`` under ZeRO-3 at 1 and 2 CPU ranks.

Per rank count, with the same per-rank batch: pre-training for ``steps`` optimizer steps from item shards
(Amazon "large"-size 500 px placeholder JPEGs, co-occurrence positives, cached VAE latents, gradient
checkpointing), then a fine-tune from that run (``init_from`` + ``finetune``: the base rebuilt from its
config, only the trainable files read) and the code export over all ranks. Measured per rank (from each
run's ``metrics.json`` ``memory``): ``load_peak_gb`` (host high-water right after the model is built and
partitioned, before any step) and ``host_peak_gb`` (whole run); ``step_s`` (median of the logged steps).
Beside them :mod:`megarec.engine.memory_model`'s prediction (params + grads + optimiser + the larger of a
step's live window, activations and transients and the export's transient + the process's measured
baseline; at load: params + grads + fp32 master + the initialisation's transient + baseline), and its
prediction for 8 and 16 GPUs at batch 16, bf16. ``rerender`` recomputes the predictions of a stored result.

Sizes: ``paper`` (Qwen2-VL-2B: 28 layers, hidden 1536, vocab 151,936; vision 32 blocks of 1280; the
tokenizer padded to Qwen's 151,646 tokens so the text decoder's output layer has its real 233M
elements), ``quick`` (a mid-size Qwen2-VL), ``tiny`` (the test).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MID_TEXT = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
MID_VISION = dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
TINY_TEXT = dict(MID_TEXT, vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(MID_VISION, depth=1, embed_dim=32, hidden_size=64, num_heads=2)


def sizes(name: str) -> dict[str, Any]:
    from tests.tiny_models import QWEN2VL_2B_TEXT, QWEN2VL_2B_VISION

    return {"paper": dict(text=QWEN2VL_2B_TEXT, vision=QWEN2VL_2B_VISION, tokenizer=151_646, items=8, steps=3,
                          finetune_steps=1, batch=1, text_tokens=64),
            "quick": dict(text=MID_TEXT, vision=MID_VISION, tokenizer=31_900, items=12, steps=3, finetune_steps=1,
                          batch=2, text_tokens=64),
            "tiny": dict(text=TINY_TEXT, vision=TINY_VISION, tokenizer=1900, items=8, steps=3, finetune_steps=1,
                         batch=2, text_tokens=16)}[name]


def prepare(work: Path, s: dict[str, Any]) -> tuple[Path, Path, Path]:
    """The model folder (config + tokenizer + image processor, no weights), a tiny VAE, the item shards."""
    from megarec.data.readers import read_domain
    from megarec.data.shards import write_shards
    from tests.tiny_models import save_qwen2vl_config, save_tiny_vae
    from tests.utgrec_fixtures import write_sample_domains

    qwen = save_qwen2vl_config(work / "qwen2vl", s["text"], s["vision"], image_pixels=(28 * 28, 224 * 224),
                               tokenizer_size=s["tokenizer"])
    vae = save_tiny_vae(work / "vae")
    domains = [read_domain(p) for p in write_sample_domains(work / "domains", s["items"])]
    shards = work / "shards"
    write_shards(domains, shards, max_count=8, images="placeholder", placeholder_size=500, overwrite=True)
    return qwen, vae, shards


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def ds_config(work: Path, bf16: bool) -> Path:
    """``ds_configs/zero3.json``, with bf16 switched on where the CPU has bf16 units (AVX512-BF16 / AMX: a 2B step
    then takes minutes; on AVX2 alone bf16 is ~30x slower than fp32, so fp32 there)."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["bf16"] = {"enabled": bool(bf16)}
    path = work / ("zero3_bf16.json" if bf16 else "zero3_fp32.json")
    path.write_text(json.dumps(cfg, indent=2))
    return path


def overrides(qwen: Path, vae: Path, shards: Path, s: dict[str, Any], run_dir: Path,
              deepspeed: Path | None = None) -> list[str]:
    o = {"utgrec.encoder.path": qwen, "utgrec.encoder.random_init": "true",
         "utgrec.encoder.gradient_checkpointing": "on", "utgrec.encoder.image_size": 224,
         "utgrec.encoder.max_text_tokens": s["text_tokens"], "utgrec.decoder.max_text_tokens": s["text_tokens"],
         "utgrec.decoder.vae_path": vae, "utgrec.decoder.vae_image_size": 64, "data.shards": shards,
         "data.num_workers": 1, "data.heldout_items": 0, "train.batch_size": s["batch"], "train.max_steps": s["steps"],
         "train.log_every": 1, "train.save_every_steps": 1000, "train.progress": "false", "train.cpu_threads": 1,
         "train.deepspeed": deepspeed or REPO / "ds_configs" / "zero3.json", "export.batch_size": 2,
         "train.run_dir": run_dir}
    return [x for k, v in o.items() for x in (f"--{k}", str(v))]


def launch(world: int, args: list[str], log: Path, timeout: float) -> float:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(29700 + world),
           str(REPO / "megarec" / "train_tokenizer.py"),
           "--config", str(REPO / "megarec" / "configs" / "utgrec_tokenizer_paper.yaml"), *args]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exit {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
    return time.time() - t0


def step_seconds(run_dir: Path) -> float | None:
    from tests.dist import tb_scalars

    got = tb_scalars(run_dir / "tb", "perf/step_s")
    return round(statistics.median(got.values()), 2) if got else None


def baseline_gb() -> float:
    """A rank's host memory before any model: the interpreter with torch, transformers, peft, deepspeed, megarec."""
    code = ("import resource, torch, transformers, peft, deepspeed, megarec.methods.utgrec.tokenizer_run; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"), check=True)
    return int(out.stdout.split()[-1]) / 2**20


def predictions(metrics: dict, s: dict[str, Any], world: int, runtime_gb: float, bf16: bool = False,
                batch: int | None = None, on_host: bool = True) -> dict[str, float]:
    from megarec.engine.memory_model import GB, ParamCounts, ZeroSettings, predict, transformer_activations

    p = metrics["memory"]["parameters"]
    t = s["text"]
    counts = ParamCounts(trainable=p["trainable"], frozen=p["total"] - p["trainable"],
                         largest_modules=(t["vocab_size"] * t["hidden_size"], s["tokenizer"] * t["hidden_size"]),
                         largest_trainable=s["tokenizer"] * t["hidden_size"])   # the text decoder's output layer
    zero = ZeroSettings.from_ds_config(json.loads((REPO / "ds_configs" / "zero3.json").read_text()), bf16=bf16)
    b = s["batch"] if batch is None else batch
    seq = 64 + s["text_tokens"] + 40                    # visual tokens + item text + prompt and code tokens
    act = transformer_activations(t["num_hidden_layers"], 2 * b * seq, t["hidden_size"], t["num_attention_heads"],
                                  seq=seq, bytes_per=2 if bf16 else 4, checkpointing=True,
                                  ffn_ratio=1.5 * t["intermediate_size"] / t["hidden_size"])   # SwiGLU: 3 matrices
    est = predict(counts, zero, world, activations=act, runtime=runtime_gb * GB, on_host=on_host)   # fused AdamW
    return est.gb()


def run(work: Path, size: str = "paper", quick: bool = False, ranks: tuple[int, ...] = (1, 2),
        timeout: float = 3600, reuse: bool = False) -> dict[str, Any]:
    """``reuse``: keep the runs of a rank count whose pre-training and fine-tune both finished (e.g. after the
    other rank count ran out of memory), run the others."""
    size = "quick" if quick and size == "paper" else size
    s = sizes(size)
    work.mkdir(parents=True, exist_ok=True)
    if reuse and (work / "qwen2vl").is_dir():
        qwen, vae, shards = work / "qwen2vl", work / "vae", work / "shards"
    else:
        qwen, vae, shards = prepare(work, s)
    bf16 = cpu_has_bf16()
    dsc = ds_config(work, bf16)
    out: dict[str, Any] = {"size": size, "batch_per_rank": s["batch"], "steps": s["steps"], "bf16": bf16,
                           "baseline_gb": round(baseline_gb(), 3)}
    for world in ranks:
        pre, ft = work / f"pre{world}", work / f"ft{world}"
        done = reuse and (pre / "metrics.json").is_file() and (ft / "metrics.json").is_file()
        wall_pre = wall_ft = 0.0
        if not done:
            for d in (pre, ft):   # a rerun starts over (train_tokenizer refuses a folder with checkpoints)
                shutil.rmtree(d, ignore_errors=True)
            # data.num_workers 0: a worker is a forked copy of the rank (two 2B ranks with a worker each were
            # OOM-killed on 24 GB before the host-memory fixes of 1f27370; not retried since)
            wall_pre = launch(world, overrides(qwen, vae, shards, s, pre, dsc) + ["--data.num_workers", "0"],
                              work / f"pre{world}.log", timeout)
            wall_ft = launch(world, overrides(qwen, vae, shards, s, ft, dsc) + [
                "--train.init_from", str(pre), "--train.finetune", "true", "--train.max_steps",
                str(s["finetune_steps"]), "--train.lr", "1e-4", "--data.num_workers", "0"], work / f"ft{world}.log",
                timeout)
        m_pre = json.loads((pre / "metrics.json").read_text())
        m_ft = json.loads((ft / "metrics.json").read_text())
        pred = predictions(m_pre, s, world, out["baseline_gb"], bf16=bf16)
        out[f"ranks{world}"] = {
            "load_peak_gb": m_pre["memory"]["load_peak_gb"], "host_peak_gb": m_pre["memory"]["host_peak_gb"],
            "finetune_load_peak_gb": m_ft["memory"]["load_peak_gb"],
            "finetune_host_peak_gb": m_ft["memory"]["host_peak_gb"],
            "step_s": step_seconds(pre), "pretrain_wall_s": round(wall_pre, 1), "finetune_wall_s": round(wall_ft, 1),
            "export_items": (m_ft.get("codes") or {}).get("num_items"), "parameters": m_pre["memory"]["parameters"],
            "predicted_gb": pred, "predicted_load_gb": pred["load"]}
    if 1 in ranks and 2 in ranks:
        one, two = out["ranks1"]["load_peak_gb"][0], max(out["ranks2"]["load_peak_gb"])
        out["load_peak_ratio_2_over_1"] = round(two / one, 3)
    metrics = json.loads((work / f"pre{ranks[0]}" / "metrics.json").read_text())
    out["predicted_gpu"] = {f"gpus{n}_batch16_bf16": predictions(metrics, s, n, 0.0, bf16=True, batch=16,
                                                                 on_host=False) for n in (8, 16)}
    return out


def repredict(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` (a stored tokenizer result) with every prediction recomputed by the current memory model from
    the stored parameter counts, baseline and bf16 switch; the measurements are untouched."""
    s = sizes(res["size"])
    out = json.loads(json.dumps(res))
    for key in (k for k in out if k.startswith("ranks") and k[5:].isdigit()):
        r, world = out[key], int(key[5:])
        pred = predictions({"memory": {"parameters": r["parameters"]}}, s, world, out["baseline_gb"], bf16=out["bf16"])
        r["predicted_gb"], r["predicted_load_gb"] = pred, pred["load"]
    first = next(k for k in out if k.startswith("ranks") and k[5:].isdigit())
    out["predicted_gpu"] = {f"gpus{n}_batch16_bf16": predictions({"memory": {"parameters": out[first]["parameters"]}},
                                                                 s, n, 0.0, bf16=True, batch=16, on_host=False)
                            for n in (8, 16)}
    return out


def _vs(pred: float, measured: float) -> str:
    return f"{pred:.2f} ({100 * (pred - measured) / measured:+.0f}%)"


def table(res: dict[str, Any]) -> str:
    rows = ["| ranks | load peak GB / rank | predicted load GB | host peak GB / rank | predicted total GB | "
            "fine-tune peak GB | step s |", "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in res if k.startswith("ranks")):
        r = res[key]
        if "load_peak_gb" not in r:   # not measured (e.g. out of memory): the prediction and the reason
            rows.append(f"| {key[5:]} | - | {r['predicted_load_gb']:.2f} | - | {r['predicted_gb']['total']:.2f} | - | "
                        f"{r.get('status', 'not run')} |")
            continue
        rows.append(f"| {key[5:]} | {' / '.join(f'{v:.2f}' for v in r['load_peak_gb'])} | "
                    f"{_vs(r['predicted_load_gb'], max(r['load_peak_gb']))} | "
                    f"{' / '.join(f'{v:.2f}' for v in r['host_peak_gb'])} | "
                    f"{_vs(r['predicted_gb']['total'], max(r['host_peak_gb']))} | "
                    f"{' / '.join(f'{v:.2f}' for v in r['finetune_host_peak_gb'])} | {r['step_s']} |")
    for name, p in res.get("predicted_gpu", {}).items():
        rows.append(f"| {name} (predicted) | - | {p['params']:.2f} params | - | {p['total']:.2f} | - | - |")
    if "load_peak_ratio_2_over_1" in res:
        rows.append(f"\nload_peak_ratio_2_over_1 = {res['load_peak_ratio_2_over_1']}")
    return "\n".join(rows)
