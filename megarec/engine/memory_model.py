"""Per-rank memory of a DeepSpeed run before it runs: parameters, gradients, optimiser state, ZeRO-3's
live-parameter window, activations and the transients of building, stepping and exporting, for a model at
N ranks under a DeepSpeed config.

Accounting (bytes per element; ``c`` = 2 with bf16, 4 in fp32; Adam; ``N`` ranks, ``P`` params, ``T`` of
them trainable, ``S`` in parameters small enough to stay whole under ZeRO-3, ``H`` the hpZ group size,
``B`` the reduce bucket, ``L`` the largest trainable parameter):

=====  ===========================  ===========================  ====================  ===============
stage  parameters                   gradients (trainable)        fp32 master           Adam moments
=====  ===========================  ===========================  ====================  ===============
0      ``P c``                      ``T c`` (+ ``4 T`` bf16)     ``4 T`` (bf16 only)   ``8 T``
1      ``P c``                      ``T c``                      ``4 T / N``           ``8 T / N``
2      ``P c``                      ``4 T / N + 2 B c``          ``4 T / N``           ``8 T / N``
3      ``(P - S) c / N + S c``      ``c T / N + 2 B c``          ``4 T / N``           ``8 T / N``
       (+ ``(P - S) c / H`` hpZ)
=====  ===========================  ===========================  ====================  ===============

ZeRO-1/2/3 keep their own fp32 partition of the trainable weights even when training in fp32 (the flat
partitions the optimiser steps on). Frozen parameters (a LoRA base) have neither gradients nor optimiser
state but are partitioned and gathered like the others under ZeRO-3. Under ZeRO-3 a rank also holds the
parameters gathered for the modules in flight: at most ``stage3_max_live_parameters``, in practice the
prefetch bucket plus the two largest modules. Activations are the caller's estimate
(:func:`transformer_activations`); the host process's own footprint (interpreter, libraries, tokenizer,
data) is the caller's ``runtime`` figure.

Measured under ZeRO-3 on CPU ranks (``tools/probe_zero3_memory.py``: one or four trainable Linears beside
frozen ones, bf16, 1 and 2 ranks): ``deepspeed.initialize`` leaves ``(4 + c) T / N + 2 B c`` (master, the
gradient partition in the training dtype, both reduce buckets), passing through ``4 L`` more; the first step
adds the moments, ``8 T / N``; a step passes through ``4 T / N`` (the fp32 copy of the gradient partition the
optimiser reads, bf16 only) and ``2 c L`` (the largest full gradient, computed and bucketed); exporting
(:func:`megarec.engine.checkpoint.gather_state_dict`) passes through ``8 L`` (the full fp32 master a rank
rebuilds by all-reduce, and the all-reduce's buffer) and ``4 T`` (the gathered state, rank 0). The stage-3
rows and transients are fitted there; stages 0-2 follow DeepSpeed's documented layout, unmeasured here.

Used by ``tools/bench_scale.py`` beside measured figures, and to choose a ZeRO config for a model.
"""
from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

GB = 2 ** 30


@dataclass(frozen=True)
class ParamCounts:
    """Elements of a model's parameters: trainable, frozen, those ZeRO-3 keeps whole, the biggest modules."""
    trainable: int
    frozen: int
    persistent: int = 0                   # in parameters of <= the persistence threshold elements
    largest_modules: tuple[int, ...] = ()  # the biggest modules' own parameter elements, largest first
    largest_trainable: int = 0            # elements of the largest trainable parameter

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_params(model: nn.Module, persistence_threshold: int = 100_000) -> ParamCounts:
    """:class:`ParamCounts` of ``model``; partitioned (ZeRO-3) parameters count at their full size."""
    def numel(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    trainable = frozen = persistent = largest = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = numel(p)
        trainable, frozen = (trainable + n, frozen) if p.requires_grad else (trainable, frozen + n)
        persistent += n if n <= persistence_threshold else 0
        largest = max(largest, n) if p.requires_grad else largest
    own = sorted((sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), reverse=True)
    return ParamCounts(trainable, frozen, persistent, tuple(own[:2]), largest)


@dataclass(frozen=True)
class ZeroSettings:
    """What of a DeepSpeed config decides memory."""
    stage: int = 0
    bf16: bool = False
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000
    reduce_bucket_size: int = 50_000_000
    hpz_partition_size: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False

    @classmethod
    def from_ds_config(cls, cfg: dict[str, Any], bf16: bool | None = None) -> "ZeroSettings":
        """From a DeepSpeed config dict; ``"auto"`` values take the defaults (``bf16``: the argument)."""
        z = cfg.get("zero_optimization", {}) or {}

        def num(key: str, default: int) -> int:
            v = z.get(key, default)
            return default if v == "auto" else int(float(v))

        enabled = (cfg.get("bf16", {}) or {}).get("enabled", False)
        return cls(stage=int(z.get("stage", 0)), bf16=bool(bf16) if enabled == "auto" else bool(enabled),
                   persistence_threshold=num("stage3_param_persistence_threshold", 100_000),
                   max_live_parameters=num("stage3_max_live_parameters", 1_000_000_000),
                   prefetch_bucket_size=num("stage3_prefetch_bucket_size", 50_000_000),
                   reduce_bucket_size=num("reduce_bucket_size", 50_000_000),
                   hpz_partition_size=num("zero_hpz_partition_size", 1),
                   offload_optimizer=(z.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
                   offload_param=(z.get("offload_param") or {}).get("device", "none") not in ("none", None))


@dataclass
class MemoryEstimate:
    """Bytes per rank on the training device; ``offloaded`` is what the offload options move to the host.

    ``total`` is the run's peak: the steady state (params, grads, master, moments, runtime) plus the larger
    of a step's extras (live window, activations, ``step_transient``) and the export's ``export_transient``.
    ``load`` is the peak up to the engine, before any step (no moments yet; ``load_transient``)."""
    params: float
    grads: float
    master: float
    moments: float
    live: float
    activations: float = 0.0
    runtime: float = 0.0
    load_transient: float = 0.0
    step_transient: float = 0.0
    export_transient: float = 0.0
    offloaded: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def optimizer(self) -> float:
        return self.master + self.moments

    @property
    def steady(self) -> float:
        return self.params + self.grads + self.optimizer + self.runtime

    @property
    def total(self) -> float:
        return self.steady + max(self.live + self.activations + self.step_transient, self.export_transient)

    @property
    def load(self) -> float:
        return self.params + self.grads + self.master + self.runtime + self.load_transient

    def gb(self) -> dict[str, float]:
        out = {k: round(v / GB, 3) for k, v in asdict(self).items() if isinstance(v, float)}
        out.update({k: round(getattr(self, k) / GB, 3) for k in ("optimizer", "load", "total")})
        return out


def predict(counts: ParamCounts, zero: ZeroSettings, world: int, *, activations: float = 0.0,
            runtime: float = 0.0, torch_adam: bool = False, on_host: bool = True) -> MemoryEstimate:
    """Per-rank bytes of ``counts`` trained with AdamW under ``zero`` at ``world`` ranks (module docstring).

    ``on_host``: the ranks compute on the host (CPU runs), so the export's gathered state (``4 T``, built
    in host memory on rank 0) is on the same memory; on GPUs only the all-reduce's ``8 L`` is on the device.

    ``torch_adam``: torch's AdamW with ``foreach`` kernels (``"foreach": true`` in a CPU run's optimizer
    params), which hold about two fp32 copies of the rank's trainable partition while they run (``8 T / N``
    more at the step). The fused optimisers step in place: DeepSpeed's on GPUs, torch's ``fused`` kernel
    that :func:`megarec.engine.deepspeed_setup.resolve_ds_config` selects on CPU ranks."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {zero.stage}")
    c = 2 if zero.bf16 else 4
    P, T, S, L = counts.total, counts.trainable, counts.persistent, counts.largest_trainable
    shard = world if zero.stage >= 1 else 1
    buckets = 2 * zero.reduce_bucket_size * c
    notes: list[str] = []
    if zero.stage == 3:
        params = (P - S) * c / world + S * c
        if zero.hpz_partition_size > 1:
            params += (P - S) * c / zero.hpz_partition_size
            notes.append(f"hpZ: a secondary copy partitioned over {zero.hpz_partition_size} ranks")
        window = zero.prefetch_bucket_size + sum(counts.largest_modules[:2])
        live = min(zero.max_live_parameters, window) * c if world > 1 else 0.0
    else:
        params, live = P * c, 0.0
    if zero.stage <= 1:
        grads = T * c + (4 * T if zero.bf16 and zero.stage == 0 else 0)
    elif zero.stage == 2:
        grads = 4 * T / world + buckets
    else:
        grads = c * T / world + buckets
    master = 4 * T / shard if (zero.stage >= 1 or zero.bf16) else 0.0
    moments = 8 * T / shard
    step_transient = (4 * T / shard if zero.bf16 else 0.0) + 2 * c * L
    if torch_adam:
        step_transient += 8 * T / shard
        notes.append("torch AdamW foreach temporaries at the step")
    load_transient = 4 * L if zero.stage >= 1 else 0.0
    export_transient = 8 * L + (4 * T if on_host else 0)
    offloaded = 0.0
    if zero.offload_optimizer and zero.stage >= 1:
        offloaded += master + moments
        master = moments = 0.0
    if zero.offload_param and zero.stage == 3:
        offloaded += params - S * c
        params = S * c
    return MemoryEstimate(float(params), float(grads), float(master), float(moments), float(live),
                          float(activations), float(runtime), float(load_transient), float(step_transient),
                          float(export_transient), offloaded, notes)


def transformer_activations(layers: int, tokens: int, hidden: int, heads: int, *, seq: int, bytes_per: int = 2,
                            checkpointing: bool = False, ffn_ratio: float = 4.0) -> float:
    """Activation bytes a transformer stack keeps for its backward (Korthikanti et al. 2022, Eq. 2: per layer
    ``s b h (34 + 5 a s / h)`` at 2 bytes, the MLP term scaled to ``ffn_ratio``). ``tokens`` = sequences x
    ``seq`` (the batch's tokens). With gradient checkpointing: each layer's input, plus one layer's full
    activations while it is recomputed."""
    mlp = 3 + 4 * ffn_ratio               # of the 34, the MLP's 19: input 2, two r*h outputs 2r each, mask 1
    per_layer = tokens * hidden * (15 + mlp + 5 * heads * seq / hidden) * bytes_per / 2
    if checkpointing:
        return layers * tokens * hidden * bytes_per + per_layer
    return layers * per_layer


def host_peak_gb() -> float:
    """This process's resident-memory high-water mark so far (Linux ``ru_maxrss``), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def host_resident_gb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``), in GB; 0 where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / GB


MMAP_THRESHOLD = 4 << 20   # bytes: tensors from here up get their own mapping, returned to the OS when freed


def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (``mallopt(M_MMAP_THRESHOLD)``); False where there is no glibc.
    Every CPU rank calls it from :func:`megarec.engine.deepspeed_setup.init_distributed`.

    For ranks whose accelerator is the host (CPU runs). glibc raises the threshold to the size of each
    mapped block it frees (up to 32 MB), so a ZeRO-3 rank's gathered parameters (27 MB each for a
    Qwen2-VL-2B MLP matrix), allocated and freed per module, soon come from the heap and stay resident
    in its arenas when freed. Measured on the 2B tokenizer at 2 CPU ranks: resident memory rose by
    ~3 GB a rank in the first forward, against ~0.1 GB at 1 rank (nothing gathered), and the second
    step was OOM-killed on 24 GB. A fixed threshold keeps every large tensor in its own mapping."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(-3, int(nbytes)))   # M_MMAP_THRESHOLD


def release_free_heap() -> bool:
    """Give the heap's freed pages back to the OS (glibc ``malloc_trim(0)``); False where there is no glibc.

    Building a model frees many tensors below glibc's mmap threshold (32 MB): a 2B model's full-size
    init tensors, partitioned away under ZeRO-3, and the copies ``deepspeed.initialize`` flattens. glibc
    keeps those pages in its arenas, so a rank's resident memory stays at what the build touched, not at
    what it holds. Called after the build and after the engine (where nothing is in flight)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def gather_host_peaks(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (e.g. its load and run peaks), on every rank, in rank order; a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return out
