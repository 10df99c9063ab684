"""Codebook distances: nearest code, top-k nearest codes, assignment probabilities.

For items ``x [N, d]`` and a codebook ``C [K, d]`` the squared L2 distance is
``||x||^2 - 2 x.c + ||c||^2``. The PyTorch path processes ``x`` in row chunks
whose ``chunk x K`` score buffer stays a few MB (one ``addmm`` per chunk into a
reused buffer), so memory is O(N + K d) beyond the output and the N x K matrix
is never held; it is also faster than ``torch.cdist`` + ``argmin`` on CPU (no
square root, no separate ``||x||^2`` pass, no fresh allocation per chunk). The
Triton path (``_triton_codebook``) keeps running best codes in registers while
looping over codebook tiles.

Ties are broken towards the lower code index in both paths.
"""
from __future__ import annotations

import torch

from megarec.kernels._dispatch import resolve_backend

# Elements of one chunk x K score buffer in the PyTorch path (16 MiB in fp32).
_CHUNK_ELEMS = 1 << 22


def _check(x: torch.Tensor, C: torch.Tensor, who: str) -> None:
    if x.dim() != 2 or C.dim() != 2:
        raise ValueError(f"{who}: x must be [N, d] and C [K, d], got {tuple(x.shape)} and {tuple(C.shape)}")
    if x.shape[1] != C.shape[1]:
        raise ValueError(f"{who}: x has dimension {x.shape[1]} but the codebook has {C.shape[1]}")
    if C.shape[0] == 0:
        raise ValueError(f"{who}: the codebook is empty")
    if x.device != C.device:
        raise ValueError(f"{who}: x is on {x.device} but the codebook is on {C.device}")
    if not (x.is_floating_point() and C.is_floating_point()):
        raise TypeError(f"{who}: x and C must be floating point, got {x.dtype} and {C.dtype}")


def _tau(tau: float | torch.Tensor, who: str) -> float:
    t = float(tau)
    if not t > 0:
        raise ValueError(f"{who}: tau must be > 0, got {t}")
    return t


def _chunk_rows(K: int) -> int:
    return max(1, _CHUNK_ELEMS // K)


def _scores_chunks(x: torch.Tensor, C: torch.Tensor):
    """Yield ``(start, end, s)`` with ``s = ||c||^2 - 2 x.c`` for rows start:end (fp32, reused buffer).

    ``||x||^2`` is left out: it does not change the order of codes in a row.
    """
    Cf = C.float()
    cn = (Cf * Cf).sum(1)
    Ct = Cf.t()
    rows = _chunk_rows(C.shape[0])
    buf = torch.empty(min(rows, x.shape[0]), C.shape[0], device=x.device, dtype=torch.float32)
    for s in range(0, x.shape[0], rows):
        xc = x[s:s + rows].float()
        out = buf[: xc.shape[0]]
        torch.addmm(cn, xc, Ct, beta=1.0, alpha=-2.0, out=out)
        yield s, s + xc.shape[0], out


def _nearest_torch(x: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Two ops per chunk (addmm, min): each op is a parallel region, and few large ones
    # matter on a busy CPU where every region waits for all its threads.
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    best = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s, e, sc in _scores_chunks(x, C):
        torch.min(sc, 1, out=(best[s:e], idx[s:e]))  # first minimum on ties
    return idx, best.add_(_sqnorm(x)).clamp_min_(0)


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square_()


def _topk_torch(x: torch.Tensor, C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    for s, e, sc in _scores_chunks(x, C):
        dist[s:e], idx[s:e] = _topk_ordered(sc, k)
    return idx, dist.add_(_sqnorm(x)[:, None]).clamp_min_(0)


def _topk_ordered(sc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest scores per row ordered by (score, index).

    torch.topk (5x faster than a full sort) leaves the order of equal values
    unspecified; rows where values equal to the k-th one fall outside the
    selection are redone with a stable sort, and the selection is reordered.
    """
    v, i = torch.topk(sc, k, dim=1, largest=False, sorted=True)
    kth = v[:, -1:]
    ambiguous = ((sc == kth).sum(1) > (v == kth).sum(1)).nonzero().squeeze(1)
    if ambiguous.numel():
        vs, is_ = torch.sort(sc[ambiguous], dim=1, stable=True)
        v[ambiguous], i[ambiguous] = vs[:, :k], is_[:, :k]
    i, perm = i.sort(1)
    v, perm2 = v.gather(1, perm).sort(dim=1, stable=True)
    return v, i.gather(1, perm2)


@torch.no_grad()
def nearest_code(x: torch.Tensor, C: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword by squared L2 distance: c = argmin_k ||x - e_k||^2 (UniGRec Eq. 3, RQ-VAE).

    Args:
        x: ``[N, d]`` vectors (residuals). C: ``[K, d]`` codebook.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``_dispatch``).
    Returns:
        ``idx [N]`` int64 (lowest index on ties) and ``dist [N]`` float32 = ``min_k ||x - c_k||^2``.
    """
    _check(x, C, "nearest_code")
    if x.shape[0] == 0:
        return x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=torch.float32)
    if resolve_backend(backend, x, C) == "triton":
        from megarec.kernels import _triton_codebook

        return _triton_codebook.nearest(x, C)
    return _nearest_torch(x, C)


@torch.no_grad()
def topk_codes(x: torch.Tensor, C: torch.Tensor, k: int, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codewords of each row, nearest first (for collision resolution).

    Returns ``idx [N, k]`` int64 and ``dist [N, k]`` float32 squared L2 distances in
    ascending order; equal distances are ordered by code index.
    """
    _check(x, C, "topk_codes")
    if not 1 <= int(k) <= C.shape[0]:
        raise ValueError(f"topk_codes: k must be in [1, {C.shape[0]}] (codebook size), got {k}")
    k = int(k)
    if x.shape[0] == 0:
        return x.new_empty(0, k, dtype=torch.int64), x.new_empty(0, k, dtype=torch.float32)
    if resolve_backend(backend, x, C) == "triton":
        from megarec.kernels import _triton_codebook

        return _triton_codebook.topk(x, C, k)
    return _topk_torch(x, C, k)


def _probs_torch(x: torch.Tensor, C: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(-||x - c||^2 / tau) = softmax((2 x.c - ||c||^2) / tau), chunked, fp32."""
    P = torch.empty(x.shape[0], C.shape[0], device=x.device, dtype=torch.float32)
    Cf = C.float()
    cn = (Cf * Cf).sum(1)
    rows = _chunk_rows(C.shape[0])
    for s in range(0, x.shape[0], rows):
        out = P[s:s + rows]
        torch.addmm(cn, x[s:s + rows].float(), Cf.t(), beta=-1.0 / tau, alpha=2.0 / tau, out=out)
        torch.softmax(out, dim=1, out=out)
    return P


def _probs_backward(x: torch.Tensor, C: torch.Tensor, P: torch.Tensor, gP: torch.Tensor,
                    tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of P = softmax(-||x - c||^2 / tau), chunked over rows.

    With G = P * (gP - sum_k P gP) (softmax backward) and rows of G summing to 0:
    dx = (2/tau) G C and dC = (2/tau) (G^T x - colsum(G) * C).
    """
    Cf = C.float()
    gx = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    gCx = torch.zeros(C.shape, device=C.device, dtype=torch.float32)
    colsum = torch.zeros(C.shape[0], device=C.device, dtype=torch.float32)
    rows = _chunk_rows(C.shape[0])
    scale = 2.0 / tau
    for s in range(0, x.shape[0], rows):
        p, g = P[s:s + rows].float(), gP[s:s + rows].float()
        G = (g - (p * g).sum(1, keepdim=True)).mul_(p)
        torch.mm(G, Cf, out=gx[s:s + rows]).mul_(scale)
        gCx.addmm_(G.t(), x[s:s + rows].float())
        colsum += G.sum(0)
    gC = gCx.sub_(colsum[:, None] * Cf).mul_(scale)
    return gx, gC


class _CodeProbs(torch.autograd.Function):
    """Autograd wrapper: saves x, C and the output P only (no distance matrix)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, C: torch.Tensor, tau: float, use_triton: bool):  # type: ignore[override]
        if use_triton:
            from megarec.kernels import _triton_codebook

            P = _triton_codebook.probs(x, C, tau)
        else:
            P = _probs_torch(x, C, tau)
        P = P.to(torch.promote_types(x.dtype, C.dtype))
        ctx.tau = tau
        ctx.save_for_backward(x, C, P)
        return P

    @staticmethod
    def backward(ctx, gP: torch.Tensor):  # type: ignore[override]
        x, C, P = ctx.saved_tensors
        # Matmul-bound: cuBLAS / the CPU BLAS already do this well on both backends.
        gx, gC = _probs_backward(x, C, P, gP, ctx.tau)
        return gx.to(x.dtype), gC.to(C.dtype), None, None


def code_probs(x: torch.Tensor, C: torch.Tensor, tau: float | torch.Tensor, *,
               backend: str = "auto") -> torch.Tensor:
    """Soft code assignment ``P = softmax_k(-||x - c_k||^2 / tau)`` (UniGRec Eq. 14; ETEGRec Eq. 6 is tau = 1).

    The logits are *negative* squared distances. Differentiable w.r.t. ``x`` and
    ``C`` (not ``tau``). Returns ``P [N, K]`` (rows sum to 1), computed in float32 and
    returned in the promoted dtype of ``x`` and ``C``.
    """
    _check(x, C, "code_probs")
    t = _tau(tau, "code_probs")
    use_triton = resolve_backend(backend, x, C) == "triton" and x.shape[0] > 0
    return _CodeProbs.apply(x, C, t, use_triton)
