"""Tree-structured codebooks (UTGRec Sec. 2.2.2).

An item's L content representations ``H' [N, L, d_c]`` become a basic
representation and L-1 increments by the prefix residual (Eq. 3):
``h~_1 = h'_1``, ``h~_l = h'_l - h'_{l-1}``. A root codebook quantises level 1
and ONE leaf codebook, shared by levels 2..L, quantises the increments; each
codebook is parameterised as ``C = E W`` (Eq. 4) with ``E [K, d_c]`` and
``W [d_c, d_c]``. The loss is L_code (Eqs. 5-7). Reconstruction applies the
inverse prefix residual ``h^_1 = e^r W^r``, ``h^_l = h^_{l-1} + e^f_{c_l} W^f``
(Sec. 2.3.1). Fine-tuning freezes E and trains only W (Sec. 2.4); dead rows of the frozen E are
still re-seeded (below).

Dead codes (not in the paper): with ``dead_code_steps > 0`` a forward in training mode
counts, per codebook, how many steps each code went unused (counts summed over ranks);
:meth:`TreeCodebooks.restart_dead_codes` re-seeds rows of ``E`` unused for that many steps
so that ``e W`` equals a recent (pooled over ranks) basic representation / increment.
"""
from __future__ import annotations


from typing import NamedTuple

import torch
from torch import nn

from megarec.distributed import all_gather_with_grad, all_reduce_sum, get_rank
from megarec.kernels import nearest_code
from megarec.tokenizer.kmeans import kmeans
from megarec.tokenizer.residual import straight_through
from megarec.tokenizer.zero import broadcast_, full_param, gathered, write_rows


def prefix_residual(h: torch.Tensor) -> torch.Tensor:
    """UTGRec Eq. 3 on ``h [N, L, d]``: keep level 1, replace level l > 1 by ``h_l - h_{l-1}``."""
    return torch.cat([h[:, :1], h[:, 1:] - h[:, :-1]], dim=1)


def inverse_prefix_residual(increments: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`prefix_residual`: ``h_1 = inc_1``, ``h_l = h_{l-1} + inc_l`` (a cumulative sum over levels)."""
    return increments.cumsum(dim=1)


def code_loss(increments: torch.Tensor, codewords: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """UTGRec Eqs. 5-7: ``L_code = (L^r + L^f) / 2``, mean over items.

    ``L^r = ||sg[h~_1] - q_1||^2 + beta ||h~_1 - sg[q_1]||^2`` for the root level and
    ``L^f`` the same term averaged over levels 2..L; ``increments`` are ``h~ [N, L, d]``
    and ``codewords`` the selected ``e_{c_l} W [N, L, d]``.

    Each squared norm is divided by ``d`` (a mean squared error per element, as the public code's
    ``F.mse_loss``): the paper's weights (lambda 200 beside a text loss per token) were set at that
    scale. With Eq. 5's plain norms lambda acts ``d`` times stronger (32x at d_c 32) and, on a real
    multi-domain pre-training (Scientific + Games, 19k items), pulls every ``H'`` onto one root code
    within 100 steps (docs/README_utgrec.md).
    """
    d = increments.shape[-1]
    per_level = (((increments.detach() - codewords) ** 2).sum(-1)
                 + beta * ((increments - codewords.detach()) ** 2).sum(-1)) / d
    return 0.5 * (per_level[:, 0].mean() + per_level[:, 1:].mean())


class TreeOutput(NamedTuple):
    """A NamedTuple so DeepSpeed ZeRO-3's hooks see the tensors inside (a dataclass hides them)."""

    codes: torch.Tensor            # [N, L] int64: root code, then leaf codes
    increments: torch.Tensor       # h~ [N, L, d] (Eq. 3)
    quantized: torch.Tensor        # straight-through e_{c_l} W per level [N, L, d]
    reconstruction: torch.Tensor   # H^ [N, L, d]: inverse prefix residual of the quantised increments
    loss: torch.Tensor             # L_code (Eq. 5)


class TreeCodebooks(nn.Module):
    """Root codebook ``E^r W^r`` for level 1 and one leaf codebook ``E^f W^f`` for levels 2..L."""

    def __init__(self, num_levels: int, root_size: int, leaf_size: int, dim: int, beta: float = 0.25,
                 kmeans_iters: int = 25, dead_code_steps: int = 0):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"tree-structured codebooks need at least 2 levels (root + leaf), got {num_levels}")
        if root_size < 1 or leaf_size < 1:
            raise ValueError(f"codebook sizes must be positive, got root {root_size}, leaf {leaf_size}")
        self.num_levels, self.dim, self.beta, self.kmeans_iters = num_levels, dim, float(beta), kmeans_iters
        self.root_size, self.leaf_size = root_size, leaf_size
        self.root_E = nn.Parameter(torch.randn(root_size, dim) * dim ** -0.5)
        self.root_W = nn.Parameter(torch.eye(dim))
        self.leaf_E = nn.Parameter(torch.randn(leaf_size, dim) * dim ** -0.5)
        self.leaf_W = nn.Parameter(torch.eye(dim))
        self.dead_code_steps = int(dead_code_steps)
        self.register_buffer("root_unused", torch.zeros(root_size, dtype=torch.long))
        self.register_buffer("leaf_unused", torch.zeros(leaf_size, dtype=torch.long))
        self._recent: dict[str, torch.Tensor] = {}

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.root_size] + [self.leaf_size] * (self.num_levels - 1)

    def root_codebook(self) -> torch.Tensor:
        """``C^r = E^r W^r`` (Eq. 4)."""
        return self.root_E @ self.root_W

    def leaf_codebook(self) -> torch.Tensor:
        """``C^f = E^f W^f`` (Eq. 4)."""
        return self.leaf_E @ self.leaf_W

    def freeze_embeddings(self, frozen: bool = True) -> None:
        """Fine-tuning switch: freeze ``E^r, E^f`` and train only ``W^r, W^f`` (``frozen=False`` undoes it)."""
        self.root_E.requires_grad_(not frozen)
        self.leaf_E.requires_grad_(not frozen)

    def _assign(self, inc: torch.Tensor, root: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        n, L, d = inc.shape
        c_root, _ = nearest_code(inc[:, 0].detach(), root.detach())
        c_leaf, _ = nearest_code(inc[:, 1:].reshape(-1, d).detach(), leaf.detach())
        return torch.cat([c_root[:, None], c_leaf.view(n, L - 1)], dim=1)

    def forward(self, h: torch.Tensor) -> TreeOutput:
        """Quantise content representations ``h [N, L, d]`` (already projected to the codebook dimension)."""
        if h.dim() != 3 or h.shape[1] != self.num_levels or h.shape[2] != self.dim:
            raise ValueError(f"expected [N, {self.num_levels}, {self.dim}] representations, got {tuple(h.shape)}")
        inc = prefix_residual(h)
        root, leaf = self.root_codebook(), self.leaf_codebook()
        codes = self._assign(inc, root, leaf)
        self._track(inc, codes)
        q = torch.cat([root[codes[:, :1]], leaf[codes[:, 1:]]], dim=1)
        ste = straight_through(inc, q)
        return TreeOutput(codes, inc, ste, inverse_prefix_residual(ste), code_loss(inc, q, self.beta))

    def _track(self, inc: torch.Tensor, codes: torch.Tensor) -> None:
        """Usage bookkeeping for dead-code restarts (training mode; a collective: counts summed over ranks)."""
        if not (self.training and self.dead_code_steps > 0):
            return
        # One index_add_ over [root | leaf] counters (bincount would read its input's max: a host sync on CUDA).
        flat = torch.cat([codes[:, 0], codes[:, 1:].reshape(-1) + self.root_size])
        counts = torch.zeros(self.root_size + self.leaf_size, dtype=torch.long, device=codes.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        all_reduce_sum(counts)
        for name, c in (("root", counts[:self.root_size]), ("leaf", counts[self.root_size:])):
            unused = getattr(self, f"{name}_unused")
            unused.copy_(torch.where(c > 0, torch.zeros_like(unused), unused + 1))
        self._recent = {"root": inc[:, 0].detach(), "leaf": inc[:, 1:].reshape(-1, self.dim).detach()}

    @torch.no_grad()
    def restart_dead_codes(self, optimizer: torch.optim.Optimizer | None = None,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed codes unused for ``dead_code_steps`` steps; returns how many. Call on every rank after
        ``optimizer.step()``: rank 0 draws from every rank's last batch, ``E`` rows become ``x W^+`` so that
        ``e W = x``, written ZeRO-3 safe (moments of the rows zeroed).

        With ``E`` frozen (fine-tuning on a new domain, Sec. 2.4.2) the dead rows are re-seeded too: a
        row no target item has used for ``dead_code_steps`` steps carries nothing for the target, while
        every row in use stays exactly as pre-trained. Without this the target's items, which the
        pre-trained codebook puts under a handful of codes, were pulled together by ``L_code``: on Office
        after Scientific + Games pre-training the root perplexity fell from 10.6 to 3.2 in 500 steps and
        99.8% of held-out items shared an ID (docs/README_utgrec.md)."""
        if self.dead_code_steps <= 0 or not self._recent:
            return 0
        # Host syncs (only with dead_code_steps > 0, off by default as in the paper): the dead set's size is read
        # per codebook each step (``nonzero``); restarts change the codebook's rows, so they cannot wait.
        restarted = 0
        for name, E, W in (("root", self.root_E, self.root_W), ("leaf", self.leaf_E, self.leaf_W)):
            unused = getattr(self, f"{name}_unused")
            dead = (unused >= self.dead_code_steps).nonzero().squeeze(1)
            if len(dead) == 0:
                continue
            pool = all_gather_with_grad(self._recent[name].float())
            w = full_param(W).float().to(pool.device)
            new = torch.empty(len(dead), self.dim, device=pool.device)
            if get_rank() == 0:
                pick = torch.multinomial(torch.ones(pool.shape[0]), len(dead), replacement=len(dead) > pool.shape[0],
                                         generator=generator)
                new.copy_(pool[pick.to(pool.device)] @ torch.linalg.pinv(w))
            broadcast_(new)
            write_rows(E, dead, new, optimizer)
            unused[dead] = 0
            restarted += len(dead)
        return restarted

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``H^ [N, L, d]`` from codes ``[N, L]`` by the inverse prefix residual of the codewords."""
        root, leaf = self._full_books()
        q = torch.cat([root[codes[:, :1]], leaf[codes[:, 1:]]], dim=1)
        return inverse_prefix_residual(q)

    def _full_books(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = [self.root_E, self.root_W, self.leaf_E, self.leaf_W]
        with gathered(params):
            return (self.root_codebook().detach().clone(), self.leaf_codebook().detach().clone())

    @torch.no_grad()
    def last_level(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, L], h~_L [N, d])``: the codes and the increment quantised by the leaf codebook."""
        inc = prefix_residual(h)
        root, leaf = self._full_books()
        return self._assign(inc, root, leaf), inc[:, -1]

    def last_codebook(self) -> torch.Tensor:
        return self._full_books()[1]

    @torch.no_grad()
    def level_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """``h~ [N, L, d]``: what each level quantises, independently of the other levels' codes (Eq. 3)."""
        return prefix_residual(h)

    def level_codebook(self, level: int) -> torch.Tensor:
        return self._full_books()[0 if level == 0 else 1]

    def snapshot(self) -> "TreeSnapshot":
        """Plain-tensor copy of the codebooks for code assignment on one rank (collective under ZeRO-3)."""
        root, leaf = self._full_books()
        return TreeSnapshot(root.float().cpu(), leaf.float().cpu(), self.num_levels)

    @torch.no_grad()
    def init_from_data(self, h: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means on the basic representations (root) and on all increments (leaf), pooled over ranks.

        Sets ``E = centroids W^+`` so that ``E W`` equals the centroids for the current
        (invertible) ``W``; written identically on every rank, ZeRO-3 safe.
        """
        inc = prefix_residual(all_gather_with_grad(h.detach().float()))
        for E, W, data, k in ((self.root_E, self.root_W, inc[:, 0], self.root_size),
                              (self.leaf_E, self.leaf_W, inc[:, 1:].reshape(-1, self.dim), self.leaf_size)):
            w = full_param(W).float().to(data.device)   # pinv needs fp32 (bf16 under DeepSpeed)
            new = torch.empty(k, self.dim, device=data.device)
            if get_rank() == 0:
                new.copy_(kmeans(data, k, iters=self.kmeans_iters, generator=generator) @ torch.linalg.pinv(w))
            broadcast_(new)
            write_rows(E, None, new)
        self.root_unused.zero_()
        self.leaf_unused.zero_()


class TreeSnapshot:
    """Frozen codebooks ``C^r, C^f`` with the tokenizer interface of ``assign_catalogue``
    (``codebook_sizes``, ``last_level``, ``last_codebook``); no collectives."""

    def __init__(self, root: torch.Tensor, leaf: torch.Tensor, num_levels: int) -> None:
        self.root, self.leaf, self.num_levels = root, leaf, num_levels
        self.codebook_sizes = [root.shape[0]] + [leaf.shape[0]] * (num_levels - 1)

    @torch.no_grad()
    def last_level(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inc = prefix_residual(h.float().to(self.root.device))
        n, L, d = inc.shape
        c_root, _ = nearest_code(inc[:, 0], self.root)
        c_leaf, _ = nearest_code(inc[:, 1:].reshape(-1, d), self.leaf)
        return torch.cat([c_root[:, None], c_leaf.view(n, L - 1)], dim=1), inc[:, -1]

    def last_codebook(self) -> torch.Tensor:
        return self.leaf

    @torch.no_grad()
    def level_inputs(self, h: torch.Tensor) -> torch.Tensor:
        return prefix_residual(h.float().to(self.root.device))

    def level_codebook(self, level: int) -> torch.Tensor:
        return self.root if level == 0 else self.leaf
