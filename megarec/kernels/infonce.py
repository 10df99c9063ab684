"""InfoNCE with cosine similarity and in-batch negatives, without the B x B matrix.

One direction a -> b (UTGRec Eq. 11, UniGRec Eq. 19) is, for row i,

    l_i = -log( exp(s(a_i, b_i)/tau) / sum_j exp(s(a_i, b_j)/tau) ) = lse_i - s(a_i, b_i)/tau

with s the cosine similarity. Two directions (ETEGRec Eq. 16, UniGRec Eq. 20)
*sum* a -> b and b -> a, as both papers write it. The papers sum over the
batch; ``reduction="mean"`` (default) divides each direction by the batch size
so the loss scale does not grow with the batch, ``"sum"`` follows the formula
literally.

Memory: the forward streams key tiles with an online log-sum-exp and keeps
only the L2-normalised inputs and per-row (and per-column) LSE; the backward
recomputes each tile. Working memory is O(B d + tile^2), never B x B.

Across ranks (``gather=True``, world W > 1): each rank's queries are local,
its keys are every rank's rows (``all_gather_with_grad``), and row i's
positive is its own row in the gathered batch. Each rank's loss is scaled by
W / B_total (``"mean"``) or W (``"sum"``), so the *average over ranks* of the
loss equals the single-process loss on the concatenated batch, and so do the
gradients after DeepSpeed/DDP gradient averaging (the gather's backward sums
key gradients over ranks). This holds for unequal per-rank batch sizes too.

Host syncs: none. The per-rank batch sizes (host ints: the offset of this rank's
positives, the loss weight, the gather's padding) come from one CPU all-gather
(gloo) per call, or from ``sizes=`` when the caller gathered them once for
several calls (UTGRec's per-level L_Ali); the row gathers are device collectives
that the host does not wait for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megarec.distributed import all_gather_with_grad, gather_sizes, get_rank, get_world_size
from megarec.kernels._dispatch import resolve_backend

# Tile sizes of the PyTorch path: a 1024 x 4096 fp32 tile is 16 MiB.
_TILE_Q = 1024
_TILE_K = 4096
# For tau >= this, every logit minus the bound 1/tau (|cos| <= 1) lies in [-2/tau, 0] and
# exp() stays a normal fp32 number, so a fixed shift replaces the running max: one exp per
# tile serves both directions. Below it the PyTorch path uses a running max.
_FIXED_SHIFT_MIN_TAU = 2.0 / 80.0

REDUCTIONS = ("mean", "sum")


def _lse_torch(qn: torch.Tensor, kn: torch.Tensor, tau: float,
               with_cols: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row LSE of S = qn kn^T / tau (and column LSE when ``with_cols``), tiled."""
    M, N = qn.shape[0], kn.shape[0]
    inv = 1.0 / tau
    fixed = tau >= _FIXED_SHIFT_MIN_TAU
    lse_r = torch.empty(M, device=qn.device, dtype=torch.float32)
    buf = torch.empty(min(_TILE_Q, M), min(_TILE_K, N), device=qn.device, dtype=torch.float32)
    shift = torch.full((1, 1), -inv, device=qn.device, dtype=torch.float32)
    col_sum = torch.zeros(N, device=qn.device, dtype=torch.float32) if with_cols else None
    col_max = torch.full((N,), -torch.inf, device=qn.device) if with_cols and not fixed else None
    for i0 in range(0, M, _TILE_Q):
        q = qn[i0:i0 + _TILE_Q]
        row_sum = torch.zeros(q.shape[0], device=qn.device, dtype=torch.float32)
        row_max = torch.full((q.shape[0],), -torch.inf, device=qn.device)
        for j0 in range(0, N, _TILE_K):
            k = kn[j0:j0 + _TILE_K]
            S = buf[: q.shape[0], : k.shape[0]]
            if fixed:
                torch.addmm(shift, q, k.t(), alpha=inv, out=S).exp_()
                row_sum += S.sum(1)
                if with_cols:
                    col_sum[j0:j0 + k.shape[0]] += S.sum(0)
                continue
            torch.mm(q, k.t(), out=S).mul_(inv)
            new_max = torch.maximum(row_max, S.amax(1))
            row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(S - new_max[:, None]).sum(1)
            row_max = new_max
            if with_cols:
                sl = slice(j0, j0 + k.shape[0])
                new_c = torch.maximum(col_max[sl], S.amax(0))
                col_sum[sl] = col_sum[sl] * torch.exp(col_max[sl] - new_c) + torch.exp(S - new_c[None, :]).sum(0)
                col_max[sl] = new_c
        lse_r[i0:i0 + q.shape[0]] = row_sum.log() + (inv if fixed else row_max)
    if not with_cols:
        return lse_r, None
    return lse_r, col_sum.log() + (inv if fixed else col_max)


def _grad_torch(qn: torch.Tensor, kn: torch.Tensor, tau: float, lse_r: torch.Tensor, g_r: torch.Tensor,
                lse_c: torch.Tensor | None, g_c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile part of the gradient: dq = dS k / tau, dk = dS^T q / tau with
    dS_ij = g_i exp(S_ij - lse_i) + h_j exp(S_ij - lsec_j) (positives are added by the caller)."""
    M, N = qn.shape[0], kn.shape[0]
    inv = 1.0 / tau
    fixed = tau >= _FIXED_SHIFT_MIN_TAU
    dq = torch.zeros(qn.shape, device=qn.device, dtype=torch.float32)
    dk = torch.zeros(kn.shape, device=qn.device, dtype=torch.float32)
    buf = torch.empty(min(_TILE_Q, M), min(_TILE_K, N), device=qn.device, dtype=torch.float32)
    buf2 = torch.empty_like(buf) if lse_c is not None and fixed else None
    if fixed:
        shift = torch.full((1, 1), -inv, device=qn.device, dtype=torch.float32)
        # exp(S - lse) = exp(S - 1/tau) * exp(1/tau - lse); the second factor is <= exp(2/tau).
        alpha = g_r * torch.exp(inv - lse_r)
        beta = g_c * torch.exp(inv - lse_c) if lse_c is not None else None
    for i0 in range(0, M, _TILE_Q):
        q = qn[i0:i0 + _TILE_Q]
        for j0 in range(0, N, _TILE_K):
            k = kn[j0:j0 + _TILE_K]
            S = buf[: q.shape[0], : k.shape[0]]
            ri, rj = slice(i0, i0 + q.shape[0]), slice(j0, j0 + k.shape[0])
            if fixed:
                torch.addmm(shift, q, k.t(), alpha=inv, out=S).exp_()
                if beta is None:
                    dS = S.mul_(alpha[ri, None])
                else:
                    dS = S.mul_(torch.add(alpha[ri, None], beta[None, rj], out=buf2[: S.shape[0], : S.shape[1]]))
            else:
                torch.mm(q, k.t(), out=S).mul_(inv)
                dS = torch.exp(S - lse_r[ri, None]).mul_(g_r[ri, None])
                if lse_c is not None:
                    dS += torch.exp(S - lse_c[None, rj]).mul_(g_c[None, rj])
            dq[ri].addmm_(dS, k)
            dk[rj].addmm_(dS.t(), q)
    return dq.mul_(inv), dk.mul_(inv)


class _InfoNCE(torch.autograd.Function):
    """loss = w_r * sum_i (lse_i - S_i,off+i) + w_c * sum_j (lsec_j - S_jj) for S = qn kn^T / tau.

    The column term (the b -> a direction on the same matrix) needs M == N and off == 0.
    Saves the normalised inputs and the LSE vectors only.
    """

    @staticmethod
    def forward(ctx, qn: torch.Tensor, kn: torch.Tensor, tau: float, offset: int, w_r: float, w_c: float,
                use_triton: bool) -> torch.Tensor:  # type: ignore[override]
        M = qn.shape[0]
        pos = (qn * kn[offset:offset + M]).sum(1) / tau
        if use_triton:
            from megarec.kernels import _triton_infonce

            lse_r = _triton_infonce.lse(qn, kn, tau)
            lse_c = _triton_infonce.lse(kn, qn, tau) if w_c else None
        else:
            lse_r, lse_c = _lse_torch(qn, kn, tau, with_cols=bool(w_c))
        loss = w_r * (lse_r - pos).sum()
        if lse_c is not None:
            loss = loss + w_c * (lse_c - pos).sum()
        ctx.save_for_backward(qn, kn, lse_r, lse_c)
        ctx.cfg = (tau, offset, w_r, w_c, use_triton)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        qn, kn, lse_r, lse_c = ctx.saved_tensors
        tau, offset, w_r, w_c, use_triton = ctx.cfg
        M = qn.shape[0]
        g_r = (grad.float() * w_r).expand(M).contiguous()
        g_c = (grad.float() * w_c).expand(kn.shape[0]).contiguous() if lse_c is not None else None
        if use_triton:
            from megarec.kernels import _triton_infonce

            dq, dk = _triton_infonce.grad(qn, kn, tau, lse_r, g_r, lse_c, g_c)
        else:
            dq, dk = _grad_torch(qn, kn, tau, lse_r, g_r, lse_c, g_c)
        # Positive terms: d(-S_i,off+i) -> -(g_i + h_i) / tau on both sides.
        gpos = (g_r + g_c[:M] if g_c is not None else g_r)[:, None] / tau
        dq -= gpos * kn[offset:offset + M]
        dk[offset:offset + M] -= gpos * qn
        return dq.to(qn.dtype), dk.to(kn.dtype), None, None, None, None, None


def infonce(a: torch.Tensor, b: torch.Tensor, tau: float | torch.Tensor, *, bidirectional: bool = True,
            gather: bool = True, reduction: str = "mean", eps: float = 1e-8,
            backend: str = "auto", sizes: list[int] | None = None) -> torch.Tensor:
    """InfoNCE over cosine similarities / tau with in-batch negatives; row i of ``a`` matches row i of ``b``.

    Args:
        a, b: ``[B, d]`` (normalised here with ``F.normalize(eps=eps)``; gradients flow through it).
        tau: temperature > 0.
        bidirectional: add the b -> a direction (ETEGRec Eq. 16, UniGRec Eq. 20); else a -> b only
            (UTGRec Eq. 11).
        gather: when a process group with world > 1 is initialised, take keys from every rank
            (see the module docstring for the loss scaling that makes averaged gradients exact).
        reduction: ``"mean"`` (each direction divided by the global batch size) or ``"sum"``.
        sizes: every rank's batch size in rank order, when the caller has them (one
            :func:`~megarec.distributed.gather_sizes` for several losses over the same rows); else
            gathered here, once per call, on the host (a CPU collective, no device sync).
    Returns:
        A scalar float32 loss.
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"infonce: a and b must both be [B, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("infonce: empty batch")
    if reduction not in REDUCTIONS:
        raise ValueError(f"infonce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    t = float(tau)
    if not t > 0:
        raise ValueError(f"infonce: tau must be > 0, got {t}")
    use_triton = resolve_backend(backend, a, b) == "triton"
    an = F.normalize(a.float(), dim=1, eps=eps)
    bn = F.normalize(b.float(), dim=1, eps=eps)
    world = get_world_size() if gather else 1
    if world == 1:
        w = 1.0 / a.shape[0] if reduction == "mean" else 1.0
        return _InfoNCE.apply(an, bn, t, 0, w, w if bidirectional else 0.0, use_triton)
    counts = list(sizes) if sizes is not None else gather_sizes(a.shape[0], a.device)
    offset = sum(counts[: get_rank()])
    w = world / sum(counts) if reduction == "mean" else float(world)
    loss = _InfoNCE.apply(an, all_gather_with_grad(bn, counts), t, offset, w, 0.0, use_triton)
    if bidirectional:
        loss = loss + _InfoNCE.apply(bn, all_gather_with_grad(an, counts), t, offset, w, 0.0, use_triton)
    return loss
