"""Batched k-means (k-means++ seeding, then Lloyd iterations) for codebook initialisation.

Written here rather than taken from a library because the assignment step must
use :func:`megarec.kernels.nearest_code` (chunked / Triton, never an N x K
matrix) and run on the tensors' own device; the centroid update is an
``index_add_``.
"""
from __future__ import annotations

import torch

from megarec.kernels import nearest_code


def kmeans_pp_seeds(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` initial centroids by D^2 sampling (k-means++); rows repeat only when ``x`` has < k distinct rows."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=generator, device="cpu"))]
    min_d = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(min_d.sum())
        if total > 0:
            j = int(torch.multinomial((min_d / total).cpu(), 1, generator=generator))
        else:  # every point coincides with a centroid already
            j = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        idx.append(j)
        min_d = torch.minimum(min_d, ((x - x[j]) ** 2).sum(1))
    return x[torch.tensor(idx, device=x.device)].clone()


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cluster ``x [N, d]`` into ``k`` centroids ``[k, d]`` (Lloyd's algorithm from k-means++ seeds).

    A cluster that empties is re-seeded with the point farthest from its centroid,
    so every centroid stays on the data. Stops early once assignments are stable.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, d] tensor, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    x = x.detach().float()
    centroids = kmeans_pp_seeds(x, k, generator)
    prev = None
    for _ in range(iters):
        assign, dist = nearest_code(x, centroids)
        if prev is not None and torch.equal(assign, prev):
            break
        prev = assign
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().squeeze(1)
        if len(empty):
            far = torch.argsort(dist, descending=True, stable=True)[: len(empty)]
            centroids[empty[: len(far)]] = x[far]
    return centroids
