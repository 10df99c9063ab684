"""ETEGRec (Liu et al., SIGIR 2025): the alignment losses and the joint module.

Equations refer to the paper. Everything here composes shared parts: the RQ-VAE
(:class:`~megarec.tokenizer.rqvae.RQVAE`), the T5 recommender
(:class:`~megarec.recommender.t5.GenerativeRecommender`), the fused
:func:`~megarec.kernels.code_probs` and :func:`~megarec.kernels.infonce`.

Choices where the public code (BishopLiu/ETEGRec) and the paper differ:

- **Sign of the code distributions.** The public code feeds the raw squared L2
  distance to the softmax of its KL loss (logit = d), so the *farthest* codeword
  is the most probable. Here ``P(k|v) = softmax(-||v - e_k||^2 / tau)`` as Eq. 6
  writes it (``tau = 1`` in the paper): the nearest code is the most probable.
- **Sign and reduction of L_SIA.** Eq. 15 prints a leading minus, which would
  *maximise* the divergence; the loss minimised here is the symmetric KL itself,
  summed over levels (as Eq. 15) and averaged over the batch. The public code
  averages over levels instead (``batchmean`` over ``B * L`` rows), so its
  ``mu`` corresponds to ``mu / L`` here.
- **Scale of L_SQ** (``sq_reduction``). Eqs. 8-9 write squared norms, summed over
  dimensions; the public code, whose ``mu`` / ``lambda`` (and ours, by default) were
  tuned with it, takes per-element means (MSE). Summed, L_SQ is ``d_z`` (recon) and
  ``code_dim`` (quantisation) times larger, so against it the alignment losses act
  ~20-60x weaker than where their weights were tuned. ``mean`` (default) divides each
  term by its width; ``sum`` is Eq. 9 as written.
- **Where z_E lives.** ``z_E = MLP(mean_pool(H^E))`` (Eq. 14) is mapped to the
  tokenizer's latent space (width ``code_dim``) and quantised there, level by
  level on its own residuals, as the public code does (its encoder adapter maps
  to ``e_dim``); ``z`` goes through the tokenizer's encoder first.
- **Residual chain.** ``v_{l+1} = v_l - sg[e_{c_l}]`` (Eq. 5 with the stop-gradient
  of :class:`~megarec.tokenizer.residual.ResidualQuantizer`): every level's
  distribution passes gradient to the input; each codebook learns only from its
  own level's distribution.
- **Mean pooling ignores padding** (Eq. 14; the mask is boolean). The pooled
  tokens are the history's code tokens and its EOS.
- **PSA over distinct targets.** Rows whose target item already appeared earlier
  in this rank's batch are left out of Eq. 16 (they would be false negatives),
  as in the public code; negatives come from every rank (``infonce(gather=True)``).
  L_SIA uses every row.
- **Frozen side.** The frozen component (tokenizer in recommender epochs,
  recommender in tokenizer epochs) runs in eval mode under ``torch.no_grad``, so it
  gets no gradient and no dropout; the public code leaves it in train mode.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from megarec.kernels import code_probs, infonce, nearest_code
from megarec.recommender.t5 import GenerativeRecommender
from megarec.tokenizer.rqvae import RQVAE, mlp, reconstruction_loss


# --------------------------------------------------------------------------- pure functions
def residual_code_probs(x: torch.Tensor, codebooks: Sequence[torch.Tensor], tau: float = 1.0) -> list[torch.Tensor]:
    """Per-level code distributions of ``x [N, d]`` through residual codebooks (Eqs. 4-6).

    ``P_l(k) = softmax_k(-||v_l - e^l_k||^2 / tau)`` with ``v_1 = x`` and
    ``v_{l+1} = v_l - sg[e^l_{c_l}]``, ``c_l = argmin_k ||v_l - e^l_k||^2`` (Eq. 4: the
    most probable code). Differentiable in ``x`` and in the codebooks (pass detached
    codebooks to freeze them). Probabilities are float32.
    """
    out, v = [], x.float()
    for C in codebooks:
        Cf = C.float()
        out.append(code_probs(v, Cf, tau))
        idx, _ = nearest_code(v.detach(), Cf.detach())
        v = v - Cf.detach()[idx]
    return out


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) + KL(q || p) = sum_k (p_k - q_k)(log p_k - log q_k)`` per row ``[N]`` (Eq. 15's summand).

    Probabilities are clamped at the smallest normal float before the log (a code
    with probability 0 in both rows contributes 0).
    """
    tiny = torch.finfo(p.dtype).tiny
    return ((p - q) * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(-1)


def sia_loss(p_levels: Sequence[torch.Tensor], q_levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sequence-item alignment L_SIA (Eq. 15): symmetric KL summed over levels, mean over rows.

    ``p_levels[l]`` / ``q_levels[l]``: ``[B, K_l]`` code distributions of the target
    item's ``z`` and of the sequence's ``z_E`` at level l.
    """
    if len(p_levels) != len(q_levels) or not p_levels:
        raise ValueError(f"sia_loss: {len(p_levels)} and {len(q_levels)} levels")
    return torch.stack([symmetric_kl(p, q).mean() for p, q in zip(p_levels, q_levels)]).sum()


def psa_loss(h: torch.Tensor, z_tilde: torch.Tensor, tau: float, gather: bool = True) -> torch.Tensor:
    """Preference-semantic alignment L_PSA (Eq. 16): two-way InfoNCE, cosine / tau, in-batch negatives.

    ``h [B, d]``: MLP of the decoder's first state; ``z_tilde [B, d]``: the target's
    reconstructed embedding. Both directions are summed, each averaged over the batch
    (every rank's rows are negatives when ``gather``).
    """
    return infonce(h, z_tilde, tau, bidirectional=True, gather=gather)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h [B, T, d]`` over the positions where ``mask [B, T]`` is true (Eq. 14's mean_pool)."""
    m = mask.bool()
    summed = torch.where(m[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1)
    return summed / m.sum(1, keepdim=True).clamp_min(1).to(h.dtype)


def first_occurrence(x: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: true at the first position of each distinct value of ``x [N]``."""
    n = x.shape[0]
    order = torch.argsort(x, stable=True)
    xs = x[order]
    first_sorted = torch.ones(n, dtype=torch.bool, device=x.device)
    first_sorted[1:] = xs[1:] != xs[:-1]
    out = torch.zeros(n, dtype=torch.bool, device=x.device)
    out[order] = first_sorted
    return out


# --------------------------------------------------------------------------- the module
class ETEGRecTerms(NamedTuple):
    """Unweighted loss terms of one batch (a NamedTuple: ZeRO-3's hooks see its tensors)."""

    rec: torch.Tensor     # L_REC (Eq. 13), mean token cross-entropy
    sq: torch.Tensor      # L_SQ = L_RECON + L_RQ (Eqs. 8-10) over the batch's distinct targets
    recon: torch.Tensor   # L_RECON (Eq. 9)
    sia: torch.Tensor     # L_SIA (Eq. 15)
    psa: torch.Tensor     # L_PSA (Eq. 16)


class ETEGRecModel(nn.Module):
    """Tokenizer (RQ-VAE over frozen item embeddings) + T5 recommender + the two alignment MLPs.

    Buffers: ``item_emb [N, d_s]`` (the tokenizer's input z, e.g. SASRec item
    embeddings; never trained), ``item_codes [N, L']`` (every item's current codes,
    collision level included: what the recommender reads and generates) and
    ``codes_epoch`` (the first epoch those codes serve). They travel in checkpoints
    and in the exported model, so a resumed run and ``megarec recommend`` see the
    same codes.

    :meth:`set_frozen` chooses the trained side; the frozen side is kept in eval mode
    (also across ``train()`` calls) and runs under ``torch.no_grad`` in :meth:`forward`.
    """

    def __init__(self, recommender: GenerativeRecommender, tokenizer: RQVAE, item_emb: torch.Tensor,
                 item_codes: torch.Tensor, proj_hidden: Sequence[int] = (), sia_tau: float = 1.0,
                 psa_tau: float = 0.07, sq_reduction: str = "sum") -> None:
        super().__init__()
        if sq_reduction not in ("sum", "mean"):
            raise ValueError(f"sq_reduction must be sum or mean, got {sq_reduction!r}")
        if item_emb.shape[1] != tokenizer.in_dim:
            raise ValueError(f"item embeddings have dimension {item_emb.shape[1]}, the tokenizer expects "
                             f"{tokenizer.in_dim}")
        if tokenizer.soft:
            raise ValueError("ETEGRec needs a hard RQ-VAE (rqvae.quantizer: hard)")
        self.recommender = recommender
        self.tokenizer = tokenizer
        d = recommender.cfg.d_model
        self.sia_proj = mlp([d, *proj_hidden, tokenizer.cfg.code_dim])   # Eq. 14's MLP -> latent space
        self.psa_proj = mlp([d, *proj_hidden, tokenizer.in_dim])         # Eq. 16's MLP on h^D
        self.register_buffer("item_emb", item_emb.detach().float().clone())
        self.register_buffer("item_codes", item_codes.detach().long().clone())
        self.register_buffer("codes_epoch", torch.zeros((), dtype=torch.long))
        self.sia_tau, self.psa_tau = float(sia_tau), float(psa_tau)
        self.sq_reduction = sq_reduction
        self.frozen = {"tokenizer": False, "recommender": False}
        self._register_codebooks_as_external()

    def _register_codebooks_as_external(self) -> None:
        """The codebooks are read in this module's forward, outside the quantizer's own
        forward; under ZeRO-3 they are registered so they are gathered for it."""
        try:
            import deepspeed
        except ImportError:  # pragma: no cover - deepspeed is a dependency
            return
        for C in self.tokenizer.quantizer.codebooks():
            deepspeed.zero.register_external_parameter(self, C)

    def tokenizer_dtype(self) -> torch.dtype:
        """The tokenizer's compute dtype (bf16 under DeepSpeed bf16; the ``item_emb`` buffer stays fp32)."""
        return next(self.tokenizer.parameters()).dtype

    # -- which side trains -----------------------------------------------------------
    def recommender_modules(self) -> list[nn.Module]:
        return [self.recommender, self.sia_proj, self.psa_proj]

    def set_frozen(self, tokenizer: bool, recommender: bool) -> None:
        """Freeze a side: eval mode now and after every ``train()``, forward under ``no_grad``, and
        ``requires_grad`` off.

        The last one matters under ZeRO-3: DeepSpeed keeps one gradient buffer per parameter
        and a step *copies* new gradients into it, so a parameter that gets no gradient would
        re-use its previous one (in the gradient norm that clipping uses, and in Adam's moments)
        unless ``requires_grad`` is off, in which case ZeRO-3 uses zeros. The optimiser groups
        still hold every parameter (they are built before the first epoch).
        """
        self.frozen = {"tokenizer": bool(tokenizer), "recommender": bool(recommender)}
        for p in self.tokenizer.parameters():
            p.requires_grad_(not tokenizer)
        for m in self.recommender_modules():
            for p in m.parameters():
                p.requires_grad_(not recommender)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ETEGRecModel":
        super().train(mode)
        if mode and self.frozen["tokenizer"]:
            self.tokenizer.eval()
        if mode and self.frozen["recommender"]:
            for m in self.recommender_modules():
                m.eval()
        return self

    # -- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor) -> ETEGRecTerms:
        """Every loss term of a batch (targets: global item indices ``[B]``)."""
        tok_grad = torch.enable_grad() if not self.frozen["tokenizer"] else torch.no_grad()
        rec_grad = torch.enable_grad() if not self.frozen["recommender"] else torch.no_grad()
        books = self.tokenizer.quantizer.codebooks()
        # Tokenizer on the batch's distinct target items: z~, L_SQ, and P_z per level.
        uniq, inverse = torch.unique(targets, return_inverse=True)
        with tok_grad:
            z = self.item_emb[uniq]
            r = self.tokenizer.encoder(z.to(self.tokenizer_dtype()))
            q = self.tokenizer.quantizer(r)
            z_tilde = self.tokenizer.decoder(q.quantized)
            recon = reconstruction_loss(z.float(), z_tilde.float(), self.sq_reduction)
            sq = recon + (q.loss / r.shape[-1] if self.sq_reduction == "mean" else q.loss)   # Eq. 8 (+ 10)
            p_item = residual_code_probs(r, books, self.sia_tau)
        # Recommender: L_REC, the encoder states (Eq. 11) and the decoder's first state (Eq. 12).
        with rec_grad:
            out = self.recommender(input_ids, attention_mask, labels, output_hidden_states=True)
            z_e = self.sia_proj(masked_mean(out.encoder_last_hidden_state, attention_mask))   # Eq. 14
            h_d = self.psa_proj(out.decoder_hidden_states[-1][:, 0])
        seq_books = [C.detach() for C in books] if self.frozen["tokenizer"] else books
        p_seq = residual_code_probs(z_e, seq_books, self.sia_tau)
        sia = sia_loss([p[inverse] for p in p_item], p_seq)
        keep = first_occurrence(targets)
        psa = psa_loss(h_d[keep], z_tilde[inverse][keep], self.psa_tau)
        return ETEGRecTerms(out.loss, sq, recon, sia, psa)
