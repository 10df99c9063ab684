"""The per-rank memory model (megarec.engine.memory_model): counts, the ZeRO stage table, the shipped configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from megarec.engine.memory_model import (GB, ParamCounts, ZeroSettings, count_params, predict,
                                         transformer_activations)

REPO = Path(__file__).resolve().parents[1]


def test_count_params_splits_trainable_frozen_persistent_and_largest():
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 10), nn.Embedding(1000, 100))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    model.append(model[1])                       # a shared module counts once
    c = count_params(model, persistence_threshold=2010)
    assert c.frozen == 100 * 200 + 200 + 1000 * 100
    assert c.trainable == 200 * 10 + 10 and c.largest_trainable == 200 * 10
    assert c.persistent == 200 + 200 * 10 + 10   # elements in parameters of <= 2010 elements
    assert c.largest_modules == (100_000, 20_200)


def test_predict_follows_the_stage_table():
    """1e9 params, 1e8 trainable (largest 4e7), 1e6 persistent, 8 ranks, bf16: each stage's figures by hand."""
    counts = ParamCounts(trainable=100_000_000, frozen=900_000_000, persistent=1_000_000,
                         largest_modules=(200_000_000, 50_000_000), largest_trainable=40_000_000)
    z = dict(bf16=True, reduce_bucket_size=10_000_000, prefetch_bucket_size=20_000_000)
    s0 = predict(counts, ZeroSettings(stage=0, **z), 8)
    assert (s0.params, s0.grads, s0.master, s0.moments, s0.live) == (2e9, 2e8 + 4e8, 4e8, 8e8, 0.0)
    s1 = predict(counts, ZeroSettings(stage=1, **z), 8)
    assert (s1.params, s1.grads, s1.master, s1.moments) == (2e9, 2e8, 4e8 / 8, 8e8 / 8)
    s2 = predict(counts, ZeroSettings(stage=2, **z), 8)
    assert (s2.params, s2.grads, s2.optimizer) == (2e9, 4e8 / 8 + 2 * 1e7 * 2, 12e8 / 8)
    s3 = predict(counts, ZeroSettings(stage=3, **z), 8)
    assert s3.params == pytest.approx(999e6 * 2 / 8 + 1e6 * 2)
    assert s3.live == (20e6 + 250e6) * 2 and s3.optimizer == s2.optimizer
    assert s3.grads == 2e8 / 8 + 2 * 1e7 * 2          # the gradient partition in bf16, both reduce buckets
    capped = predict(counts, ZeroSettings(stage=3, max_live_parameters=100_000_000, **z), 8)
    assert capped.live == 1e8 * 2
    hpz = predict(counts, ZeroSettings(stage=3, hpz_partition_size=4, **z), 8)
    assert hpz.params == pytest.approx(s3.params + 999e6 * 2 / 4) and hpz.notes
    off = predict(counts, ZeroSettings(stage=3, offload_optimizer=True, offload_param=True, **z), 8)
    assert off.optimizer == 0 and off.params == 1e6 * 2 and off.offloaded == pytest.approx(12e8 / 8 + 999e6 * 2 / 8)
    fp32 = predict(counts, ZeroSettings(stage=3), 1)
    assert fp32.params == pytest.approx(1e9 * 4) and fp32.live == 0.0   # one rank gathers nothing
    assert set(s3.gb()) >= {"params", "grads", "optimizer", "live", "load", "total"}
    with pytest.raises(ValueError, match="world"):
        predict(counts, ZeroSettings(), 0)


def test_transients_load_and_peak():
    """The phases tools/probe_zero3_memory.py measured: load = params + grads + master + 4 L; the peak is the
    steady state plus the larger of the step (live + activations + 4 T / N + 2 c L) and the export (8 L, + 4 T
    when the ranks compute on the host)."""
    counts = ParamCounts(trainable=100_000_000, frozen=900_000_000, largest_modules=(200_000_000, 50_000_000),
                         largest_trainable=40_000_000)
    z = ZeroSettings(stage=3, bf16=True, reduce_bucket_size=10_000_000, prefetch_bucket_size=20_000_000)
    e = predict(counts, z, 8, activations=1e8, runtime=5e8)
    assert e.load == e.params + e.grads + 4e8 / 8 + 5e8 + 4 * 4e7
    assert e.step_transient == 4e8 / 8 + 2 * 2 * 4e7
    assert e.export_transient == 8 * 4e7 + 4e8
    steady = e.params + e.grads + 12e8 / 8 + 5e8
    assert e.total == steady + max(e.live + 1e8 + e.step_transient, e.export_transient)
    gpu = predict(counts, z, 8, on_host=False)
    assert gpu.export_transient == 8 * 4e7
    fp32 = predict(counts, ZeroSettings(stage=3), 2)
    assert fp32.step_transient == 2 * 4 * 4e7           # no fp32 copy of an fp32 gradient partition


def test_predictions_match_the_measured_2b_tokenizer():
    """docs/results/scale/tokenizer_2b.json: the memory model within 20% of every measured peak (load and
    run, 1 and 2 ranks), recomputed from the record's parameter counts."""
    import importlib.util

    record = json.loads((REPO / "docs" / "results" / "scale" / "tokenizer_2b.json").read_text())["tokenizer"]
    spec = importlib.util.spec_from_file_location("scale_tokenizer", REPO / "tools" / "scale_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fresh = tool.repredict(record)
    for key in ("ranks1", "ranks2"):
        r = fresh[key]
        assert r["predicted_load_gb"] == pytest.approx(max(r["load_peak_gb"]), rel=0.2), key
        assert r["predicted_gb"]["total"] == pytest.approx(max(r["host_peak_gb"]), rel=0.2), key
        assert r["predicted_gb"] == record[key]["predicted_gb"], f"{key}: stored predictions are stale (--repredict)"


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    z = ZeroSettings.from_ds_config(json.loads(path.read_text()), bf16=True)
    assert z.stage in (2, 3) and z.bf16
    if "hpz" in path.name:
        assert z.stage == 3 and z.hpz_partition_size == 8
    if "offload" in path.name:
        assert z.offload_optimizer


def test_transformer_activations_reference():
    """Korthikanti et al. (2022) Eq. 2 at the standard MLP ratio: s b h (34 + 5 a s / h) bytes per layer."""
    s, b, h, a, layers = 512, 4, 1024, 16, 3
    full = transformer_activations(layers, s * b, h, a, seq=s)
    assert full == pytest.approx(layers * s * b * h * (34 + 5 * a * s / h))
    ckpt = transformer_activations(layers, s * b, h, a, seq=s, checkpointing=True)
    assert ckpt == pytest.approx(layers * s * b * h * 2 + full / layers)
    assert transformer_activations(1, s * b, h, a, seq=s, bytes_per=4) == pytest.approx(2 * full / layers)


def test_count_params_reads_partitioned_sizes():
    """Under ZeRO-3 a parameter's tensor is a shard; ``ds_numel`` is its full size."""
    lin = nn.Linear(10, 10)
    lin.weight.data = torch.zeros(5)
    lin.weight.ds_numel = 100
    assert count_params(lin).total == 110
    assert GB == 2 ** 30


def test_torch_adam_foreach_temporaries_are_counted():
    counts = ParamCounts(trainable=1_000_000, frozen=0)
    plain = predict(counts, ZeroSettings(stage=3), 2)
    cpu = predict(counts, ZeroSettings(stage=3), 2, torch_adam=True)
    assert cpu.step_transient - plain.step_transient == 8 * 1_000_000 / 2 and cpu.notes


HEAP_PROBE = r"""
import ctypes, sys, torch
from megarec.engine.memory_model import host_resident_gb, release_free_heap
ctypes.CDLL(None).mallopt(-3, 64 << 20)      # M_MMAP_THRESHOLD: 1 MB tensors come from the heap
keep = [torch.ones(1 << 18) for _ in range(600)]  # 600 x 1 MB, every page touched
del keep[::2]                                 # 300 MB of holes inside the heap, none at its top
before = host_resident_gb()
assert release_free_heap()
print(before - host_resident_gb())
"""


def _probe(code: str, *args: str) -> float:
    """GB the probe ``code`` reports freed, run in a fresh process (glibc's mmap threshold is process state)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_release_free_heap_returns_freed_pages_to_the_os():
    """The build's freed tensors stay resident in glibc's heap until ``malloc_trim``: the probe's 300 MB of
    holes leave the process only through :func:`release_free_heap`."""
    assert _probe(HEAP_PROBE) > 0.2


MMAP_PROBE = r"""
import ctypes, sys, torch
from megarec.engine.memory_model import fix_mmap_threshold, host_resident_gb
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
else:
    ctypes.CDLL(None).mallopt(-3, 64 << 20)  # where glibc's dynamic threshold ends up after large frees
keep = [torch.ones(2 << 20) for _ in range(60)]   # 60 x 8 MB, every page touched
before = host_resident_gb()
del keep[::2]
print(before - host_resident_gb())
"""


@pytest.mark.parametrize("mode", ["fixed", "raised"])
def test_fixed_mmap_threshold_returns_large_frees_at_once(mode):
    """Under :func:`fix_mmap_threshold` a freed 8 MB tensor (a gathered ZeRO-3 parameter, say) leaves the
    process at once; with the threshold glibc raises by itself it stays resident."""
    freed = _probe(MMAP_PROBE, mode)
    assert (freed > 0.2) if mode == "fixed" else (freed < 0.05), (mode, freed)


def test_zero3_probe_measures_moments_and_export_per_element(tmp_path):
    """tools/probe_zero3_memory.py at 1 CPU rank (16M trainable elements in one Linear): the first step leaves
    Adam's two fp32 moments (8 bytes an element, and a few step buffers) and the export passes through ~8 bytes an element (the full
    fp32 master rebuilt by all-reduce and its buffer), the figures predict() uses."""
    import subprocess
    import sys

    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "probe_zero3_memory.py"), "--trainable", str(4096 ** 2),
                    "--frozen", str(4096 ** 2), "--ranks", "1", "--json", str(out)], check=True, timeout=600,
                   capture_output=True)
    rank = json.loads(out.read_text())["results"]["1"][0]
    ph, t = rank["phases"], rank["trainable"]
    moments = (ph["step2"]["start_gb"] - ph["step1"]["start_gb"]) * GB / t
    assert 7.0 < moments < 11.0, ph              # 8.1 at 67M elements; ~40 MB of step buffers on top at 16M
    assert 6.5 < ph["export"]["bytes_per_element"] < 10.0, ph
