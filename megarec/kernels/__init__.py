"""Fused ops, each one public function dispatching Triton <-> chunked PyTorch.

- ``nearest_code(x, C)``, ``topk_codes(x, C, k)``: squared-L2 code search, no grad.
- ``code_probs(x, C, tau)``: softmax(-||x - c||^2 / tau), differentiable (UniGRec Eq. 14, ETEGRec Eq. 6).
- ``infonce(a, b, tau)``: cosine InfoNCE, tiled online LSE, negatives from all ranks.

Every op takes ``backend="auto" | "triton" | "torch"`` (see ``_dispatch.resolve_backend``).
"""
from megarec.kernels.codebook import code_probs, nearest_code, topk_codes
from megarec.kernels.infonce import infonce

__all__ = ["nearest_code", "topk_codes", "code_probs", "infonce"]
