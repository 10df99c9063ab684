"""Backend choice for the fused ops: Triton kernel or chunked PyTorch.

``"auto"`` picks Triton when every tensor is on a CUDA device and Triton is
importable, or when ``TRITON_INTERPRET=1`` is set (then CPU tensors run the
kernels in Triton's interpreter: fp32, slow, for tests). Otherwise it picks
the chunked PyTorch path, which is the real CPU training path.

Triton decides at *decoration* time whether a ``@triton.jit`` function is
interpreted, so the kernel modules are imported lazily, on first use.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``backend`` and the op's input tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    usable = triton_available() and (on_cuda or interpret_mode())
    if backend == "auto":
        return "triton" if usable else "torch"
    if backend == "triton" and not usable:
        why = "triton is not installed" if not triton_available() else \
            "the tensors are not on a CUDA device and TRITON_INTERPRET=1 is not set"
        raise RuntimeError(f"backend='triton' cannot run: {why}")
    return backend
