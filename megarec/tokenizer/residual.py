"""Residual codebooks (RQ): hard residual quantisation with a straight-through estimator.

Level l quantises the residual left by levels < l (ETEGRec Eqs. 4-5):
``c_l = argmin_k ||v_l - e^l_k||^2``, ``v_{l+1} = v_l - e^l_{c_l}``, ``v_1 = r``,
and the quantised vector is ``sum_l e^l_{c_l}``. Training uses the codebook +
commitment loss of ETEGRec Eq. 10 and the straight-through estimator.

:class:`ResidualCodebooks` holds the per-level codebooks and the parts shared
with the soft quantiser (:mod:`megarec.tokenizer.soft`): k-means initialisation
from data and dead-code restarts, both safe under DeepSpeed ZeRO-3 (parameters
gathered, master weights updated, identical codebooks on every rank).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from megarec.distributed import all_gather_with_grad, all_reduce_sum, get_rank
from megarec.kernels import nearest_code
from megarec.tokenizer.kmeans import kmeans
from megarec.tokenizer.zero import broadcast_, full_param, write_rows


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value of ``q``, gradient of ``x`` (the straight-through estimator of VQ-VAE)."""
    return x + (q - x).detach()


def rq_loss(inputs: Sequence[torch.Tensor], codewords: Sequence[torch.Tensor], beta: float = 0.25) -> torch.Tensor:
    """ETEGRec Eq. 10: ``sum_l ||sg[v_l] - e_{c_l}||^2 + beta ||v_l - sg[e_{c_l}]||^2``, mean over items.

    ``inputs[l]`` is the residual ``v_l [N, d]`` quantised at level l, ``codewords[l]``
    its selected codeword ``e_{c_l} [N, d]``.
    """
    total = inputs[0].new_zeros(())
    for v, e in zip(inputs, codewords):
        codebook_term = ((v.detach() - e) ** 2).sum(-1)
        commitment = ((v - e.detach()) ** 2).sum(-1)
        total = total + (codebook_term + beta * commitment).mean()
    return total


class QuantizerOutput(NamedTuple):
    """A NamedTuple so DeepSpeed ZeRO-3's hooks see the tensors inside (a dataclass hides them)."""

    quantized: torch.Tensor               # [N, d]; straight-through (hard) or soft sum of codewords
    codes: torch.Tensor                   # [N, L] int64 (argmax / nearest code per level)
    loss: torch.Tensor                    # quantisation loss (Eq. 10 hard; 0 for soft pre-training)
    inputs: list[torch.Tensor]            # residual fed to each level, [N, d] each
    probs: list[torch.Tensor] | None = None   # soft: per-level assignment probabilities [N, K_l]


class ResidualCodebooks(nn.Module):
    """L codebooks ``[K_l, d]`` (sizes per level) with k-means init and dead-code restarts.

    Codebooks are direct parameters ``codebook_0 .. codebook_{L-1}`` of this module
    (so ZeRO-3's pre-forward hook gathers them). A forward in training mode records,
    per level, how many steps each code has gone unused (counts summed over ranks)
    and keeps that step's residuals; :meth:`restart_dead_codes` re-seeds codes unused
    for ``dead_code_steps`` steps from those residuals.
    """

    def __init__(self, codebook_sizes: Sequence[int], dim: int, dead_code_steps: int = 0, kmeans_iters: int = 25):
        super().__init__()
        if len(codebook_sizes) == 0 or min(codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be a non-empty list of positive sizes, got {list(codebook_sizes)}")
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.dim = int(dim)
        self.dead_code_steps = int(dead_code_steps)
        self.kmeans_iters = int(kmeans_iters)
        for level, k in enumerate(self.codebook_sizes):
            self.register_parameter(f"codebook_{level}", nn.Parameter(torch.randn(k, dim) * dim ** -0.5))
            self.register_buffer(f"unused_{level}", torch.zeros(k, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._recent: list[torch.Tensor | None] = [None] * len(self.codebook_sizes)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def codebook(self, level: int) -> nn.Parameter:
        return getattr(self, f"codebook_{level}")

    def codebooks(self) -> list[nn.Parameter]:
        return [self.codebook(level) for level in range(self.num_levels)]

    def _unused(self, level: int) -> torch.Tensor:
        return getattr(self, f"unused_{level}")

    # -- usage bookkeeping (called from forward in training mode) -------------------
    def _track(self, level: int, inputs: torch.Tensor, codes: torch.Tensor) -> None:
        if not (self.training and self.dead_code_steps > 0):
            return
        counts = torch.bincount(codes, minlength=self.codebook_sizes[level])
        all_reduce_sum(counts)  # a code used on any rank is alive
        unused = self._unused(level)
        unused.copy_(torch.where(counts > 0, torch.zeros_like(unused), unused + 1))
        self._recent[level] = inputs.detach()

    # -- data-dependent parameter writes (ZeRO-3 safe) ----------------------------
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means initialisation, level by level on the hard residuals of ``x [N, d]``.

        Samples from every rank are pooled, rank 0 clusters them, the centroids are
        broadcast and written on every rank (gathered under ZeRO-3).
        """
        pool = all_gather_with_grad(x.detach().float())
        residual = pool
        for level, k in enumerate(self.codebook_sizes):
            p = self.codebook(level)
            centroids = torch.empty(k, self.dim, device=pool.device)
            if get_rank() == 0:
                centroids.copy_(kmeans(residual, k, iters=self.kmeans_iters, generator=generator))
            broadcast_(centroids)
            write_rows(p, None, centroids)
            idx, _ = nearest_code(residual, centroids)
            residual = residual - centroids[idx]
            self._unused(level).zero_()
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, optimizer: torch.optim.Optimizer | None = None,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed codes unused for ``dead_code_steps`` steps with recent residuals; returns how many.

        Call after ``optimizer.step()`` on every rank. The dead set is the same on every
        rank (usage counts are summed over ranks); replacement residuals are drawn by
        rank 0 from every rank's last batch and broadcast.
        """
        if self.dead_code_steps <= 0:
            return 0
        restarted = 0
        for level in range(self.num_levels):
            dead = (self._unused(level) >= self.dead_code_steps).nonzero().squeeze(1)
            if len(dead) == 0 or self._recent[level] is None:
                continue
            pool = all_gather_with_grad(self._recent[level].float())
            new = torch.empty(len(dead), self.dim, device=pool.device)
            if get_rank() == 0:
                replace = len(dead) > pool.shape[0]
                pick = torch.multinomial(torch.ones(pool.shape[0]), len(dead), replacement=replace, generator=generator)
                new.copy_(pool[pick.to(pool.device)])
            broadcast_(new)
            write_rows(self.codebook(level), dead, new, optimizer)
            self._unused(level)[dead] = 0
            restarted += len(dead)
        return restarted

    def full_codebooks(self) -> list[torch.Tensor]:
        """Detached copies of every codebook (gathered under ZeRO-3), for inference and checks."""
        return [full_param(p) for p in self.codebooks()]

    def last_codebook(self) -> torch.Tensor:
        """The last level's codebook ``[K_L, d]`` (what collision handling re-assigns into)."""
        return full_param(self.codebook(self.num_levels - 1))


class ResidualQuantizer(ResidualCodebooks):
    """Hard residual quantiser (TIGER / ETEGRec): nearest code per level, STE, Eq. 10 loss.

    ``residual_{l+1} = residual_l - sg[e_{c_l}]``: codebooks learn only from their own
    codebook term, the encoder gets the commitment terms of every level and the
    decoder's gradient through the straight-through output.
    """

    def __init__(self, codebook_sizes: Sequence[int], dim: int, beta: float = 0.25, dead_code_steps: int = 0,
                 kmeans_iters: int = 25):
        super().__init__(codebook_sizes, dim, dead_code_steps, kmeans_iters)
        self.beta = float(beta)

    def forward(self, r: torch.Tensor) -> QuantizerOutput:
        residual = r
        inputs, codewords, codes = [], [], []
        for level in range(self.num_levels):
            C = self.codebook(level)
            idx, _ = nearest_code(residual.detach(), C.detach())
            e = C[idx]
            self._track(level, residual, idx)
            inputs.append(residual)
            codewords.append(e)
            codes.append(idx)
            residual = residual - e.detach()
        quantized = torch.stack(codewords).sum(0)
        return QuantizerOutput(straight_through(r, quantized), torch.stack(codes, 1),
                               rq_loss(inputs, codewords, self.beta), inputs)

    @torch.no_grad()
    def last_level(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, L], v_L [N, d])``: the codes and the residual quantised by the last codebook."""
        residual, codes = r, []
        books = self.full_codebooks()
        for level, C in enumerate(books):
            if level == self.num_levels - 1:
                last = residual
            idx, _ = nearest_code(residual, C)
            codes.append(idx)
            residual = residual - C[idx]
        return torch.stack(codes, 1), last
