"""The UTGRec universal item tokenizer as one module (UTGRec Secs. 2.2-2.3).

content encoder -> ``H [B, L, d]`` (Eq. 2) -> MLP adapter ``H' [B, L, d_c]`` -> prefix residual +
tree-structured codebooks (Eqs. 3-7, :class:`~megarec.tokenizer.tree.TreeCodebooks`) -> inverse
prefix residual -> linear projection ``H_hat [B, L, D]`` -> text decoder (Eq. 8) and image decoder
with diffusion loss (Eq. 9).

One training step feeds ``2B`` items: B anchors then their B co-occurring positives. Only the
anchors are quantised; their ``H_hat`` reconstructs their own content (L_Raw, Eq. 10) and the
positives' content (L_Re, Eq. 12) in one decoder call over ``2B`` rows. :meth:`UTGRecModel.forward`
calls every submodule on every rank at every step (ZeRO-3 gathers parameters in forward hooks,
so a rank that skipped one would hang the others); the method module
(:mod:`megarec.methods.utgrec.tokenizer`) turns its outputs into ``L_T`` (Eq. 13).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from megarec.methods.utgrec.content_encoder import ContentEncoder
from megarec.methods.utgrec.image_decoder import DiffusionOutput, ImageDecoder
from megarec.methods.utgrec.text_decoder import MaskedTextDecoder
from megarec.tokenizer.tree import TreeCodebooks, TreeOutput


class UTGRecOutput(NamedTuple):
    """A NamedTuple so ZeRO-3's hooks see the tensors."""

    h: torch.Tensor             # H [2B, L, d]: anchors then positives (Eq. 2)
    tree: TreeOutput            # the anchors' quantisation (codes, increments, L_code)
    text_nll: torch.Tensor      # [2B] summed NLL of the anchors' text, then of the positives' text, from the anchors' H_hat
    text_tokens: torch.Tensor   # [2B] number of text tokens per row
    image: DiffusionOutput      # [2B] per-item diffusion loss and image flag, same row order


class UTGRecModel(nn.Module):
    """Encoder, adapter, tree codebooks, projection back and the two decoders."""

    def __init__(self, encoder: ContentEncoder, *, num_levels: int = 3, root_size: int = 256, leaf_size: int = 512,
                 code_dim: int = 128, adapter_hidden: int = 512, decoder_dim: int = 0, decoder_heads: int = 8,
                 decoder_dropout: float = 0.1, max_text_tokens: int = 128, image_tokens: int = 0,
                 image_token_dim: int = 0, diffusion_width: int = 512, diffusion_depth: int = 3,
                 num_train_timesteps: int = 1000, samples_per_token: int = 4, beta: float = 0.25,
                 dead_code_steps: int = 0) -> None:
        super().__init__()
        if encoder.num_codes != num_levels:
            raise ValueError(f"encoder has {encoder.num_codes} code tokens, codebooks have {num_levels} levels")
        d, D = encoder.hidden_size, decoder_dim or encoder.hidden_size
        self.encoder = encoder
        self.adapter = nn.Sequential(nn.Linear(d, adapter_hidden), nn.GELU(), nn.Linear(adapter_hidden, code_dim))
        self.tree = TreeCodebooks(num_levels, root_size, leaf_size, code_dim, beta=beta, dead_code_steps=dead_code_steps)
        self.up = nn.Linear(code_dim, D)
        self.text_decoder = MaskedTextDecoder(D, encoder.vocab_size, max_text_tokens, num_levels, decoder_heads,
                                              decoder_dropout)
        self.max_text_tokens = max_text_tokens
        self.image_decoder = None
        if image_tokens > 0:
            self.image_decoder = ImageDecoder(D, image_tokens, image_token_dim, num_levels, decoder_heads,
                                              decoder_dropout, diffusion_width, diffusion_depth, num_train_timesteps,
                                              samples_per_token)

    @property
    def codebook_sizes(self) -> list[int]:
        return self.tree.codebook_sizes

    def init_text_prior(self, texts: list[str]) -> None:
        """Start the text decoder at the unigram distribution of ``texts`` (the catalogue's item texts, as
        reconstructed: at most ``max_text_tokens`` each); see :mod:`megarec.methods.utgrec.text_decoder`."""
        ids, mask = self.encoder.text_targets(texts, self.max_text_tokens)
        self.text_decoder.init_prior(ids[mask])

    def code_inputs(self, **enc_inputs: torch.Tensor) -> torch.Tensor:
        """``H' = MLP(H)`` ``[B, L, d_c]``: what the codebooks quantise."""
        return self.adapter(self.encoder(**enc_inputs))

    def forward(self, enc_inputs: dict[str, torch.Tensor], text_ids: torch.Tensor, text_mask: torch.Tensor,
                latents: torch.Tensor | None, has_image: torch.Tensor, quantize: bool = True) -> UTGRecOutput:
        """``enc_inputs`` for 2B items (anchors, then positives); ``text_ids/text_mask [2B, T]``,
        ``latents [2B, |V|, C]`` and ``has_image [2B]`` are the reconstruction targets.

        ``quantize=False`` (codebook warm-up): ``H_hat`` comes from ``H'`` itself (the inverse
        prefix residual of its own prefix residual); the codebooks still run, so their loss can
        enter the objective with weight 0.
        """
        h = self.encoder(**enc_inputs)
        B = h.shape[0] // 2
        hc = self.adapter(h[:B])
        tree = self.tree(hc)
        z = tree.reconstruction if quantize else hc
        h_hat = self.up(z)
        h_hat2 = torch.cat([h_hat, h_hat], dim=0)
        nll = self.text_decoder.nll(h_hat2, text_ids, text_mask)
        if self.image_decoder is not None:
            if latents is None:
                raise ValueError("the model has an image decoder: pass latents (zeros and has_image=False without)")
            image = self.image_decoder(h_hat2, latents, has_image)
        else:
            image = DiffusionOutput(nll.new_zeros(nll.shape), torch.zeros_like(has_image, dtype=torch.bool))
        return UTGRecOutput(h, tree, nll, text_mask.sum(1), image)
