"""UniGRec's loss terms as small pure functions (UniGRec, Eqs. 14, 17-20, 22).

The codebook distance, the soft quantiser and the uniformity loss (Eqs. 14, 16, 17)
live in :mod:`megarec.kernels` and :mod:`megarec.tokenizer.soft`; this module holds
what only the joint stage needs:

- :func:`code_log_probs`: ``log softmax(-||r - e_k||^2 / tau)`` (Eq. 14 in log space, so
  that the KL of two near one-hot distributions at ``tau_min`` stays finite). The public
  code builds these logits as ``+d``, which makes the *farthest* codeword the most probable;
  the sign here is the paper's.
- :func:`symmetric_kl`: tokenizer-side collaborative distillation ``L_CD^T`` (Eq. 18).
- :func:`recommender_distillation`: recommender-side ``L_CD^R`` (Eqs. 19-20), two-way
  InfoNCE over cosine similarity, negatives from every rank (:func:`megarec.kernels.infonce`).
- :func:`joint_loss`: ``L_Joint`` (Eq. 22).
"""
from __future__ import annotations

from typing import Sequence

import torch

from megarec.kernels import infonce


def code_log_probs(r: torch.Tensor, C: torch.Tensor, tau: float) -> torch.Tensor:
    """UniGRec Eq. 14 in log space: ``log p(k) = log_softmax_k(-||r - e_k||^2 / tau)``, ``[N, K]``.

    ``r [N, d]`` residuals, ``C [K, d]`` codebook; differentiable in both. The nearest
    codeword has the largest log-probability (negative distance is the logit).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    rf, Cf = r.float(), C.float()
    d2 = (rf * rf).sum(1, keepdim=True) - 2.0 * rf @ Cf.t() + (Cf * Cf).sum(1)[None, :]
    return torch.log_softmax(-d2.clamp_min(0.0) / float(tau), dim=1)


def residual_log_probs(inputs: Sequence[torch.Tensor], codebooks: Sequence[torch.Tensor],
                       tau: float) -> list[torch.Tensor]:
    """Per-level ``log p_l [N, K_l]`` from the residual fed to each level (``QuantizerOutput.inputs``)."""
    if len(inputs) != len(codebooks):
        raise ValueError(f"{len(inputs)} residual levels for {len(codebooks)} codebooks")
    return [code_log_probs(r, C, tau) for r, C in zip(inputs, codebooks)]


def symmetric_kl(log_p: Sequence[torch.Tensor], log_q: Sequence[torch.Tensor]) -> torch.Tensor:
    """UniGRec Eq. 18: ``sum_l [KL(P_l || Q_l) + KL(Q_l || P_l)]``, mean over rows.

    Inputs are per-level log-probabilities ``[N, K_l]``. ``KL(P||Q) + KL(Q||P) =
    sum_k (p_k - q_k)(log p_k - log q_k)`` (non-negative, zero iff equal).
    """
    if len(log_p) != len(log_q) or not log_p:
        raise ValueError(f"need the same non-zero number of levels, got {len(log_p)} and {len(log_q)}")
    total = log_p[0].new_zeros((), dtype=torch.float32)
    for lp, lq in zip(log_p, log_q):
        if lp.shape != lq.shape:
            raise ValueError(f"level shapes differ: {tuple(lp.shape)} vs {tuple(lq.shape)}")
        lp, lq = lp.float(), lq.float()
        total = total + ((lp.exp() - lq.exp()) * (lp - lq)).sum(1).mean()
    return total


def recommender_distillation(h_dec: torch.Tensor, h_tea: torch.Tensor, tau: float = 0.07,
                             gather: bool = True) -> torch.Tensor:
    """UniGRec Eqs. 19-20: ``InfoNCE(H^Dec, H^Tea) + InfoNCE(H^Tea, H^Dec)``, cosine / ``tau'``.

    Row i of ``h_dec [B, d]`` (projected first decoder state) matches row i of ``h_tea``
    (teacher embedding of the target item); the other rows -- of every rank when
    distributed and ``gather`` -- are negatives. Each direction is a mean over rows.
    """
    return infonce(h_dec, h_tea, tau, bidirectional=True, gather=gather)


def joint_loss(rec: torch.Tensor, recon: torch.Tensor, cd_t: torch.Tensor, cd_r: torch.Tensor,
               recon_weight: float, cd_t_weight: float, cd_r_weight: float) -> torch.Tensor:
    """UniGRec Eq. 22: ``L_Rec + lambda_Recon L_Recon + lambda_T L_CD^T + lambda_R L_CD^R``."""
    return rec + recon_weight * recon + cd_t_weight * cd_t + cd_r_weight * cd_r
