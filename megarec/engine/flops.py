"""FLOPs of a training step and the device's peak, for ``perf/mfu``.

**Counted, not derived from a config.** :class:`StepFlopCounter` is a ``TorchDispatchMode`` that
adds up the FLOPs of every matmul-like aten op (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
convolutions, scaled-dot-product attention, with PyTorch's own formulas in
``torch.utils.flop_counter``, plus the CPU flash-attention kernels it lacks) while one micro-batch
runs its forward and backward. Counting what autograd actually runs is honest by construction: a
frozen weight costs its forward (2 N per token) and the activation gradient (2 N, only when
something upstream needs it: LoRA, a trainable layer below), a trainable weight also its weight
gradient (2 N); attention scores and values are included; nothing of the model needs to be
described (the loop knows no model, and UTGRec runs the encoder, decoders and diffusion head over
different token counts). An analytic ``6 N tokens`` would overcount a frozen 2B base by half.

Phases: ops inside ``task.loss`` are *forward*; ops inside ``engine.backward`` are *backward*,
except those run with grad mode on (the recomputation of gradient-checkpointed blocks: both
``torch.utils.checkpoint`` variants recompute under ``enable_grad`` while the autograd engine runs
backward formulas with grad mode off), which are *recompute*: hardware FLOPs, not model FLOPs.
``perf/mfu`` uses model FLOPs (forward + backward), ``perf/hfu`` adds the recompute.

Not counted: element-wise work (norms, activations, softmax outside SDPA, the optimizer),
collectives, and kernels outside aten (the Triton InfoNCE / codebook kernels, the
``flash_attn`` package): MFU is slightly low where those matter.

The count is taken once per process, on the first micro-batch the task marks typical
(:meth:`~megarec.engine.loop.LoopTask.measurable`), divided by its samples and reused: window
FLOPs = FLOPs per sample x samples. Per-step sequence lengths vary, so this is an estimate of the
window's work, good to the variation of the batch shapes.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins: the more specific names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12),
    ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("A30", 165e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
)


def _cpu_sdpa(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_EXTRA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


class StepFlopCounter(TorchDispatchMode):
    """FLOPs by phase: set :attr:`phase` to ``"forward"`` or ``"backward"`` around the two halves of a step.
    ``counts``: ``forward``, ``backward`` (model FLOPs) and ``recompute`` (checkpointing, hardware only)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts = {"forward": 0, "backward": 0, "recompute": 0}
        self.failed = 0   # matmul-like ops whose FLOPs could not be computed (left out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = _EXTRA.get(packet)
        try:
            if formula is not None:
                n = formula(*args, **kwargs)
            elif packet in flop_registry:
                n = flop_registry[packet](*args, **kwargs, out_val=out)
            else:
                return out
        except Exception:   # a formula that does not know these arguments: never fail the training step
            self.failed += 1
            return out
        if self.phase == "forward":
            self.counts["forward"] += int(n)
        else:
            self.counts["recompute" if torch.is_grad_enabled() else "backward"] += int(n)
        return out

    @property
    def model_flops(self) -> int:
        return self.counts["forward"] + self.counts["backward"]

    @property
    def hardware_flops(self) -> int:
        return self.model_flops + self.counts["recompute"]


def peak_flops(device: torch.device | str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one ``device``: ``override_tflops * 1e12`` when given (``train.peak_tflops``; the only
    source on CPU), else the bf16 dense peak of a known GPU by name; ``None`` when unknown (no MFU logged)."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak
    return None
