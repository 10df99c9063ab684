"""UniGRec (Eqs. 13-22): the joint module -- soft tokenizer, T5 recommender, distillation adapters.

Everything is composed from shared parts: the soft RQ-VAE
(:class:`~megarec.tokenizer.rqvae.RQVAE` with ``rqvae.quantizer: soft``), the T5
:class:`~megarec.recommender.t5.GenerativeRecommender`, the loss functions of
:mod:`megarec.methods.unigrec.losses`.

One training step (Sec. 3.5.2, Algorithm 1 lines 14-20), temperature fixed at ``tau``:

1. the tokenizer runs on the batch's distinct items (histories and targets): soft
   assignment probabilities ``p_l`` (Eq. 14) and ``L_Recon`` (Eq. 7, no quantisation term);
2. each history item becomes L input embeddings ``p_l @ O_l`` (Eq. 15; the
   scatter into the vocabulary followed by ``@ O`` is the product with the level's
   rows of the token table), plus the one-hot embedding of its collision token
   (dedup level) and EOS, as the hard path lays them out -- so gradients of
   ``L_Rec`` (Eq. 13) reach the tokenizer;
3. ``L_CD^T`` (Eq. 18): the masked-mean encoder state and the target's teacher
   embedding are projected to the tokenizer's input width and quantised by the
   tokenizer; symmetric KL between their code distributions, in log space;
4. ``L_CD^R`` (Eqs. 19-20): two-way InfoNCE between the projected first decoder
   state and the teacher embedding of the target, over distinct targets.

Targets (labels) are the items' hard codes, regenerated every epoch
(:mod:`megarec.methods.unigrec.plugin`); ``identifiers = "hard"`` (ablation) also feeds
the history as hard codes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from megarec.data.code_vocab import EOS, PAD, CodeVocab
from megarec.methods.etegrec.model import first_occurrence, masked_mean
from megarec.methods.unigrec.losses import recommender_distillation, residual_log_probs, symmetric_kl
from megarec.recommender.t5 import GenerativeRecommender
from megarec.tokenizer.rqvae import RQVAE, reconstruction_loss
from megarec.tokenizer.soft import uniformity_loss


class UniGRecTerms(NamedTuple):
    """Unweighted loss terms of one batch (a NamedTuple: ZeRO-3's hooks see its tensors)."""

    rec: torch.Tensor          # L_Rec (Eq. 13), mean token cross-entropy
    recon: torch.Tensor        # L_Recon (Eq. 7) over the batch's distinct items
    cd_t: torch.Tensor         # L_CD^T (Eq. 18); 0 when off
    cd_r: torch.Tensor         # L_CD^R (Eq. 20); 0 when off
    uniformity: torch.Tensor   # L_CU (Eq. 17) of the batch's items: logged only (not in Eq. 22)


def soft_history_embeddings(level_emb: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
                            table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input embeddings ``[B, W*L'+1, d]`` and mask from per-item token embeddings.

    ``level_emb [U, L', d]``: the L' input embeddings of each distinct item (Eq. 15 rows);
    ``slots [B, W]``: row of ``level_emb`` of each history item (-1 = padding); ``counts [B]``:
    items per history; ``table``: the token embedding table (for EOS and PAD). The layout is
    the hard path's (:meth:`CodeVocab.encode_histories`): item tokens, EOS, then PAD.
    """
    b, w = slots.shape
    levels, d = level_emb.shape[1], level_emb.shape[2]
    valid = slots >= 0
    x = level_emb[slots.clamp(min=0)]                                     # [B, W, L', d]
    x = torch.where(valid[..., None, None], x, table[PAD].to(x.dtype))
    x = torch.cat([x.reshape(b, w * levels, d), table[PAD].to(x.dtype).expand(b, 1, d)], dim=1)
    pos = torch.arange(w * levels + 1, device=slots.device)
    eos = counts[:, None] * levels
    x = torch.where((pos[None, :] == eos)[..., None], table[EOS].to(x.dtype), x)
    return x, (pos[None, :] <= eos).long()


def teacher_lstsq_map(teacher_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """``[d_t + 1, d_in]``: the affine map (weights, then bias) of least squares from the teacher's item
    embeddings to the tokenizer's item inputs, ``argmin_W ||[T 1] W - Z||^2`` over the catalogue (float64;
    the same on every rank)."""
    T = torch.cat([teacher_emb.double(), teacher_emb.new_ones(len(teacher_emb), 1).double()], 1)
    return torch.linalg.lstsq(T, item_emb.double(), driver="gelsd").solution.float()


class UniGRecModel(nn.Module):
    """Soft RQ-VAE tokenizer + T5 recommender + the distillation projections (Sec. 3.4).

    Buffers (in checkpoints and the exported model): ``item_emb [N, d_in]`` (the
    tokenizer's input, item text embeddings), ``teacher_emb [N, d_t]`` (the SASRec
    teacher's item embeddings), ``item_codes [N, L']`` (current hard codes, collision
    level included: the targets and what inference reads) and ``codes_epoch``.

    ``tokenizer_frozen``: the tokenizer (tokenizer lr 0) stays in eval mode, its parameters
    have ``requires_grad`` off (out of the optimiser), its pass over the items runs under
    ``no_grad``; L_CD^T still trains the projections through it.
    """

    def __init__(self, recommender: GenerativeRecommender, tokenizer: RQVAE, item_emb: torch.Tensor,
                 teacher_emb: torch.Tensor | None, item_codes: torch.Tensor, tau: float,
                 identifiers: str = "soft", cd_t: bool = True, cd_r: bool = True, cd_tau: float = 0.07,
                 tokenizer_frozen: bool = False, cd_t_tau: float = 0.0, teacher_map: str = "fixed") -> None:
        super().__init__()
        if not tokenizer.soft:
            raise ValueError("UniGRec needs a soft RQ-VAE (rqvae.quantizer: soft)")
        if item_emb.shape[1] != tokenizer.in_dim:
            raise ValueError(f"item embeddings have dimension {item_emb.shape[1]}, the tokenizer expects "
                             f"{tokenizer.in_dim}")
        if identifiers not in ("soft", "hard"):
            raise ValueError(f"identifiers must be soft or hard, got {identifiers!r}")
        if (cd_t or cd_r) and teacher_emb is None:
            raise ValueError("the distillation losses need teacher embeddings")
        if teacher_map not in ("fixed", "trainable"):
            raise ValueError(f"teacher_map must be fixed or trainable, got {teacher_map!r}")
        self.recommender, self.tokenizer = recommender, tokenizer
        self.vocab: CodeVocab = recommender.vocab
        self.tau, self.identifiers, self.cd_tau = float(tau), identifiers, float(cd_tau)
        self.cd_t_tau = float(cd_t_tau) if cd_t_tau > 0 else self.tau    # Eq. 18's distributions: Eq. 14 at tau
        self.num_rq_levels = tokenizer.quantizer.num_levels
        d = recommender.cfg.d_model
        # Sec. 3.4: linear layers to the tokenizer's input width (L_CD^T) and to the teacher's (L_CD^R).
        # Only the adapters of active losses exist, so every parameter gets a gradient every step.
        self.enc_proj = nn.Linear(d, tokenizer.in_dim) if cd_t else None
        # The teacher side of L_CD^T: trainable (the paper's linear layer) lets both projections go constant,
        # a minimum (KL 0) that carries nothing of the teacher; fixed = the least-squares map from the
        # teacher's item embeddings to the tokenizer's inputs, so only the student side can move.
        self.tea_proj = nn.Linear(teacher_emb.shape[1], tokenizer.in_dim) if cd_t and teacher_map == "trainable" \
            else None
        self.register_buffer("tea_map", teacher_lstsq_map(teacher_emb, item_emb) if cd_t and teacher_map == "fixed"
                             else torch.zeros(0))
        self.dec_proj = nn.Linear(d, teacher_emb.shape[1]) if cd_r else None
        self.register_buffer("item_emb", item_emb.detach().float().clone())
        self.register_buffer("teacher_emb", teacher_emb.detach().float().clone() if teacher_emb is not None
                             else torch.zeros(0))
        self.register_buffer("item_codes", item_codes.detach().long().clone())
        self.register_buffer("codes_epoch", torch.zeros((), dtype=torch.long))
        self.tokenizer_frozen = bool(tokenizer_frozen)
        if self.tokenizer_frozen:
            tokenizer.requires_grad_(False)
        tokenizer.tau.fill_(self.tau)          # Sec. 3.5.2: tau fixed at tau_min in stage 2
        self._register_external()
        self.train(self.training)

    def teacher_rows(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets' teacher embeddings in the tokenizer's input space (L_CD^T's teacher side)."""
        tea = self.teacher_emb[targets]
        if self.tea_proj is not None:
            return self.tea_proj(tea)
        return tea @ self.tea_map[:-1] + self.tea_map[-1]

    def _register_external(self) -> None:
        """Parameters read here outside their own module's forward (the token table in Eq. 15,
        the codebooks in Eq. 18's log-probabilities): gathered for this forward under ZeRO-3."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, self.recommender.embedding.weight)
        for C in self.tokenizer.quantizer.codebooks():
            deepspeed.zero.register_external_parameter(self, C)

    def train(self, mode: bool = True) -> "UniGRecModel":
        super().train(mode)
        if mode and self.tokenizer_frozen:
            self.tokenizer.eval()
        return self

    # -- tokenizer ---------------------------------------------------------------------
    def _grad(self):
        return torch.no_grad() if self.tokenizer_frozen else torch.enable_grad()

    def item_token_embeddings(self, probs: list[torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """Eq. 15 per item: ``[U, L', d]``, level l = ``p_l @ O[level l's tokens]``; the collision
        level (if any) is the embedding of the item's current collision token."""
        table = self.recommender.embedding.weight
        rows = []
        for level, p in enumerate(probs):
            start, end = self.vocab.level_range(level)
            rows.append(p.to(table.dtype) @ table[start:end])
        for level in range(self.num_rq_levels, self.vocab.num_levels):
            tokens = self.item_codes[items, level] + int(self.vocab.offsets[level])
            rows.append(table[tokens])
        return torch.stack(rows, 1)

    # -- forward -----------------------------------------------------------------------
    def forward(self, items: torch.Tensor, counts: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> UniGRecTerms:
        """Loss terms of a batch. ``items [B, W]`` history item indices (-1 = padding),
        ``counts [B]``, ``input_ids``/``attention_mask`` the same histories as hard tokens
        (used by the ``hard`` ablation), ``labels [B, L']`` the targets' tokens, ``targets [B]``."""
        valid = items >= 0
        uniq, inverse = torch.unique(torch.cat([items[valid], targets]), return_inverse=True)
        slots = torch.full_like(items, -1)
        slots[valid] = inverse[: int(valid.sum())]
        with self._grad():
            z = self.item_emb[uniq]
            q = self.tokenizer.quantizer(self.tokenizer.encoder(z), self.tau)
            z_hat = self.tokenizer.decoder(q.quantized).float()
            recon = reconstruction_loss(z, z_hat, self.tokenizer.recon_reduction)    # as in stage 1
            uni = uniformity_loss(q.probs).detach()
        if self.identifiers == "soft":
            level_emb = self.item_token_embeddings(q.probs, uniq)
            x, mask = soft_history_embeddings(level_emb, slots, counts, self.recommender.embedding.weight)
            out = self.recommender.t5(inputs_embeds=x, attention_mask=mask, labels=labels, output_hidden_states=True)
        else:
            mask = attention_mask
            out = self.recommender(input_ids, attention_mask, labels, output_hidden_states=True)
        zero = recon.new_zeros(())
        cd_t = cd_r = zero
        if self.enc_proj is not None:
            h_enc = masked_mean(out.encoder_last_hidden_state, mask)       # Sec. 3.4.1, padding ignored
            rows = torch.cat([self.enc_proj(h_enc), self.teacher_rows(targets)])
            # With a frozen tokenizer (no requires_grad) the gradient still reaches the projections.
            qd = self.tokenizer.quantizer(self.tokenizer.encoder(rows), self.tau)
            logp = residual_log_probs(qd.inputs, self.tokenizer.quantizer.codebooks(), self.cd_t_tau)
            b = targets.shape[0]
            cd_t = symmetric_kl([lp[:b] for lp in logp], [lp[b:] for lp in logp])
        if self.dec_proj is not None:
            keep = first_occurrence(targets)                                # a repeated target is no negative
            h_dec = self.dec_proj(out.decoder_hidden_states[-1][:, 0])      # first decoder state (Sec. 3.4.2)
            cd_r = recommender_distillation(h_dec[keep], self.teacher_emb[targets][keep], self.cd_tau)
        return UniGRecTerms(out.loss, recon, cd_t, cd_r, uni)
