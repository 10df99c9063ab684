"""Triton kernels for codebook distances (imported lazily by ``codebook.py``).

Each program owns ``BLOCK_N`` rows of x and loops over codebook tiles of
``BLOCK_K`` codes, so the N x K distance matrix never exists: the nearest
code keeps a running (min, argmin) per row, the top-k keeps the k best
(score, index) pairs packed into sortable int64 keys and merges each tile with
``tl.topk``, and the probabilities make two passes (online log-sum-exp, then
the normalised write). Scores are ``||c||^2 - 2 x.c`` in fp32; ``||x||^2`` is
added to the final distances only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megarec.kernels._dispatch import interpret_mode

_BLOCK_N = 64
_BLOCK_K = 64
_INT64_MAX = 2**63 - 1


@triton.jit
def _scores(x_ptr, c_ptr, cn_ptr, rows, row_mask, k0, K, D, stride_x, stride_c,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_N, BLOCK_K] tile of ||c||^2 - 2 x.c (+inf for codes past K) and its code indices."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dm = dd < D
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_mask[:, None] & dm[None, :], other=0.0)
        ct = tl.load(c_ptr + cols[:, None] * stride_c + dd[None, :], mask=col_mask[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(ct), acc, input_precision=PREC)
    cn = tl.load(cn_ptr + cols, mask=col_mask, other=0.0)
    s = cn[None, :] - 2.0 * acc
    return tl.where(col_mask[None, :], s, float("inf")), cols


@triton.jit
def _row_sqnorm(x_ptr, rows, row_mask, D, stride_x, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_mask[:, None] & (dd < D)[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt * xt, axis=1)
    return acc


@triton.jit
def _nearest_kernel(x_ptr, c_ptr, cn_ptr, idx_ptr, dist_ptr, N, K, D, stride_x, stride_c,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        s, cols = _scores(x_ptr, c_ptr, cn_ptr, rows, row_mask, k0, K, D, stride_x, stride_c,
                          BLOCK_N, BLOCK_K, BLOCK_D, PREC)
        m, mi = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = m < best  # strict: an earlier tile (lower index) wins ties
        best = tl.where(better, m, best)
        best_i = tl.where(better, (k0 + mi).to(tl.int64), best_i)
    xn = _row_sqnorm(x_ptr, rows, row_mask, D, stride_x, BLOCK_N, BLOCK_D)
    tl.store(idx_ptr + rows, best_i, mask=row_mask)
    tl.store(dist_ptr + rows, tl.maximum(best + xn, 0.0), mask=row_mask)


@triton.jit
def _pack(s, cols):
    """(score, index) -> int64 key whose signed order is the lexicographic order of the pair."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order -> signed int order
    return (key.to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def _unpack(key):
    hi = (key >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), key & 0xFFFFFFFF


@triton.jit
def _topk_kernel(x_ptr, c_ptr, cn_ptr, idx_ptr, dist_ptr, N, K, D, k, stride_x, stride_c,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
                 PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    best = tl.full([BLOCK_N, KP], 0x7FFFFFFFFFFFFFFF, dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        s, cols = _scores(x_ptr, c_ptr, cn_ptr, rows, row_mask, k0, K, D, stride_x, stride_c,
                          BLOCK_N, BLOCK_K, BLOCK_D, PREC)
        keys = _pack(s, tl.broadcast_to(cols[None, :], [BLOCK_N, BLOCK_K]))
        tile_best = tl.topk(keys, KP, dim=1, descending=False)
        both = tl.reshape(tl.join(best, tile_best), [BLOCK_N, 2 * KP])
        best = tl.topk(both, KP, dim=1, descending=False)
    val, idx = _unpack(best)
    xn = _row_sqnorm(x_ptr, rows, row_mask, D, stride_x, BLOCK_N, BLOCK_D)
    j = tl.arange(0, KP)
    out = rows[:, None] * k + j[None, :]
    mask = row_mask[:, None] & (j < k)[None, :]
    tl.store(idx_ptr + out, idx, mask=mask)
    tl.store(dist_ptr + out, tl.maximum(val + xn[:, None], 0.0), mask=mask)


@triton.jit
def _probs_kernel(x_ptr, c_ptr, cn_ptr, p_ptr, N, K, D, stride_x, stride_c, inv_tau,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: online log-sum-exp of -s / tau
        s, cols = _scores(x_ptr, c_ptr, cn_ptr, rows, row_mask, k0, K, D, stride_x, stride_c,
                          BLOCK_N, BLOCK_K, BLOCK_D, PREC)
        logit = -s * inv_tau
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(acc)
    for k0 in range(0, K, BLOCK_K):  # pass 2: write the probabilities
        s, cols = _scores(x_ptr, c_ptr, cn_ptr, rows, row_mask, k0, K, D, stride_x, stride_c,
                          BLOCK_N, BLOCK_K, BLOCK_D, PREC)
        p = tl.exp(-s * inv_tau - lse[:, None])
        tl.store(p_ptr + rows[:, None] * K + cols[None, :], p, mask=row_mask[:, None] & (cols < K)[None, :])


def _prepare(x: torch.Tensor, C: torch.Tensor):
    """Common dtype (fp32 unless both share a 16-bit type), contiguous rows, ||c||^2, dot precision."""
    if x.dtype != C.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or interpret_mode():
        x, C = x.float(), C.float()
    x, C = x.contiguous(), C.contiguous()
    cn = C.float().pow(2).sum(1)
    block_d = max(16, min(64, triton.next_power_of_2(x.shape[1])))
    # fp32: full-precision products, so the argmin agrees with the fp32 PyTorch path.
    prec = "ieee" if x.dtype == torch.float32 else None
    return x, C, cn, block_d, prec


def nearest(x: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, C, cn, block_d, prec = _prepare(x, C)
    N, K = x.shape[0], C.shape[0]
    idx = torch.empty(N, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, dtype=torch.float32, device=x.device)
    _nearest_kernel[(triton.cdiv(N, _BLOCK_N),)](x, C, cn, idx, dist, N, K, x.shape[1], x.stride(0), C.stride(0),
                                                 BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_D=block_d, PREC=prec)
    return idx, dist


def topk(x: torch.Tensor, C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if C.shape[0] >= 2**31:
        raise ValueError("topk_codes (triton): codebooks of 2^31 codes or more do not fit the packed keys")
    x, C, cn, block_d, prec = _prepare(x, C)
    N, K = x.shape[0], C.shape[0]
    kp = triton.next_power_of_2(k)
    idx = torch.empty(N, k, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, k, dtype=torch.float32, device=x.device)
    _topk_kernel[(triton.cdiv(N, _BLOCK_N),)](x, C, cn, idx, dist, N, K, x.shape[1], k, x.stride(0), C.stride(0),
                                              BLOCK_N=_BLOCK_N, BLOCK_K=max(_BLOCK_K, kp), BLOCK_D=block_d, KP=kp,
                                              PREC=prec)
    return idx, dist


def probs(x: torch.Tensor, C: torch.Tensor, tau: float) -> torch.Tensor:
    x, C, cn, block_d, prec = _prepare(x, C)
    N, K = x.shape[0], C.shape[0]
    P = torch.empty(N, K, dtype=torch.float32, device=x.device)
    _probs_kernel[(triton.cdiv(N, _BLOCK_N),)](x, C, cn, P, N, K, x.shape[1], x.stride(0), C.stride(0), 1.0 / tau,
                                               BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_D=block_d, PREC=prec)
    return P
