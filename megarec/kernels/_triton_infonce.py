"""Triton kernels for the tiled InfoNCE (imported lazily by ``infonce.py``).

Flash-attention style, for S = Q K^T * scale with unit-norm rows:

- ``_lse_kernel``: one program per block of Q rows streams K tiles with an
  online (running max, running sum) log-sum-exp; only the LSE is written.
  The column LSE of the same matrix is the row LSE of (K, Q).
- ``_grad_kernel``: dX = scale * dS Y where, for rows x of X against tiles y of Y,
  dS = g_own * exp(S - lse_own) + g_other * exp(S - lse_other) (row and column
  softmax terms). The same kernel gives dQ (X=Q, Y=K) and dK (X=K, Y=Q, roles of
  the two LSE vectors swapped), recomputing S tile by tile; the positive-pair
  terms are added on the host (O(B d)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M = 64
_BLOCK_N = 64


@triton.jit
def _sim_tile(x_ptr, y_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_y, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < D
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_mask[:, None] & dm[None, :], other=0.0)
        yt = tl.load(y_ptr + cols[:, None] * stride_y + dd[None, :], mask=col_mask[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PREC)
    return acc * scale


@triton.jit
def _lse_kernel(x_ptr, y_ptr, lse_ptr, M, N, D, stride_x, stride_y, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _sim_tile(x_ptr, y_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_y, scale,
                      BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(acc), mask=row_mask)


@triton.jit
def _grad_kernel(x_ptr, y_ptr, out_ptr, lse_own_ptr, g_own_ptr, lse_other_ptr, g_other_ptr, M, N, D,
                 stride_x, stride_y, scale, HAS_OWN: tl.constexpr, HAS_OTHER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                 PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dout = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_mask = dout < D
    if HAS_OWN:
        lse_own = tl.load(lse_own_ptr + rows, mask=row_mask, other=0.0)
        g_own = tl.load(g_own_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _sim_tile(x_ptr, y_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_y, scale,
                      BLOCK_M, BLOCK_N, BLOCK_D, PREC)
        ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_OWN:
            ds += tl.exp(s - lse_own[:, None]) * g_own[:, None]
        if HAS_OTHER:
            lse_o = tl.load(lse_other_ptr + cols, mask=col_mask, other=0.0)
            g_o = tl.load(g_other_ptr + cols, mask=col_mask, other=0.0)
            ds += tl.exp(s - lse_o[None, :]) * g_o[None, :]
        ds = tl.where(row_mask[:, None] & col_mask[None, :], ds, 0.0)
        yt = tl.load(y_ptr + cols[:, None] * stride_y + dout[None, :], mask=col_mask[:, None] & dout_mask[None, :],
                     other=0.0)
        acc = tl.dot(ds, yt, acc, input_precision=PREC)
    tl.store(out_ptr + rows[:, None] * D + dout[None, :], acc * scale, mask=row_mask[:, None] & dout_mask[None, :])


def _blocks(D: int) -> tuple[int, int]:
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    block_do = max(16, min(128, triton.next_power_of_2(D)))
    return block_d, block_do


def lse(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Row log-sum-exp of x y^T / tau (fp32 [M])."""
    x, y = x.float().contiguous(), y.float().contiguous()
    M, N, D = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty(M, dtype=torch.float32, device=x.device)
    block_d, _ = _blocks(D)
    _lse_kernel[(triton.cdiv(M, _BLOCK_M),)](x, y, out, M, N, D, x.stride(0), y.stride(0), 1.0 / tau,
                                             BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, PREC="ieee")
    return out


def _grad_side(x, y, tau, lse_own, g_own, lse_other, g_other) -> torch.Tensor:
    M, N, D = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty(M, D, dtype=torch.float32, device=x.device)
    block_d, block_do = _blocks(D)
    dummy = lse_own if lse_own is not None else lse_other
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(D, block_do))
    _grad_kernel[grid](x, y, out,
                       lse_own if lse_own is not None else dummy, g_own if g_own is not None else dummy,
                       lse_other if lse_other is not None else dummy, g_other if g_other is not None else dummy,
                       M, N, D, x.stride(0), y.stride(0), 1.0 / tau,
                       HAS_OWN=lse_own is not None, HAS_OTHER=lse_other is not None,
                       BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, BLOCK_DO=block_do, PREC="ieee")
    return out


def grad(q: torch.Tensor, k: torch.Tensor, tau: float, lse_r: torch.Tensor, g_r: torch.Tensor,
         lse_c: torch.Tensor | None, g_c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile part of (dq, dk) for S = q k^T / tau; see the module docstring."""
    q, k = q.float().contiguous(), k.float().contiguous()
    dq = _grad_side(q, k, tau, lse_r, g_r, lse_c, g_c)
    dk = _grad_side(k, q, tau, lse_c, g_c, lse_r, g_r)
    return dq, dk
