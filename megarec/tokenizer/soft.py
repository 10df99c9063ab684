"""Soft residual codebooks (UniGRec soft identifiers).

Each level turns its residual into assignment probabilities over the codewords,
``p_l(k) = softmax_k(-||r_{l-1} - e^l_k||^2 / tau)`` (UniGRec Eq. 14), and
quantises it to the probability-weighted codeword ``sum_k p_l(k) e^l_k``; the
residual continues with that soft vector. Everything is differentiable, so soft
pre-training uses no quantisation loss (UniGRec Sec. 3.5.1); the temperature is
annealed linearly (Eq. 16) and a uniformity loss on batch-mean probabilities
(Eq. 17) keeps codewords in use. Hard codes at inference are the argmax.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megarec.kernels import code_probs, nearest_code
from megarec.tokenizer.residual import QuantizerOutput, ResidualCodebooks


def linear_tau(step: int, total_steps: int, tau_max: float, tau_min: float) -> float:
    """UniGRec Eq. 16: ``tau(step) = tau_max - step / total_step * (tau_max - tau_min)``, clamped to the range."""
    if total_steps <= 0:
        return float(tau_min)
    frac = min(max(step / total_steps, 0.0), 1.0)
    return float(tau_max - frac * (tau_max - tau_min))


def uniformity_loss(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """UniGRec Eq. 17: ``sum_l sum_k pbar_l(k) log pbar_l(k)``, ``pbar_l`` the batch-mean of ``p_l [N, K]``.

    Minimising it maximises the entropy of codeword usage. ``0 log 0`` is 0, and the log
    is clamped at the smallest normal float so a codeword whose probability underflows
    to 0 at a low temperature gets a finite gradient (``d/dp p log p = log p + 1``).
    """
    total = probs[0].new_zeros(())
    for p in probs:
        pbar = p.mean(0)
        total = total + (pbar * torch.log(pbar.clamp_min(torch.finfo(pbar.dtype).tiny))).sum()
    return total


class SoftResidualQuantizer(ResidualCodebooks):
    """Residual quantiser with soft identifiers; ``forward(r, tau)`` needs the current temperature."""

    def __init__(self, codebook_sizes: Sequence[int], dim: int, dead_code_steps: int = 0, kmeans_iters: int = 25):
        super().__init__(codebook_sizes, dim, dead_code_steps, kmeans_iters)

    def forward(self, r: torch.Tensor, tau: float) -> QuantizerOutput:
        residual = r
        inputs, soft, probs, codes = [], [], [], []
        for level in range(self.num_levels):
            C = self.codebook(level)
            p = code_probs(residual, C, tau)
            q = p @ C.to(p.dtype)
            idx = p.detach().argmax(1)
            self._track(level, residual, idx)
            inputs.append(residual)
            probs.append(p)
            soft.append(q)
            codes.append(idx)
            residual = residual - q.to(residual.dtype)
        quantized = torch.stack(soft).sum(0).to(r.dtype)
        return QuantizerOutput(quantized, torch.stack(codes, 1), r.new_zeros(()), inputs, probs)

    @torch.no_grad()
    def last_level(self, r: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, L], r_{L-1} [N, d])`` along the soft residual path at temperature ``tau``.

        The argmax of Eq. 14 is the nearest codeword, so the last code is
        ``nearest_code(r_{L-1}, C_L)`` and collision handling can rank alternatives by distance.
        """
        residual, codes = r, []
        books = self.full_codebooks()
        for level, C in enumerate(books):
            if level == self.num_levels - 1:
                last = residual
            idx, _ = nearest_code(residual, C)
            codes.append(idx)
            residual = residual - code_probs(residual, C, tau) @ C
        return torch.stack(codes, 1), last
