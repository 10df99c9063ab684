"""T5 generative recommender over semantic-ID tokens (TIGER Sec. 3.2).

The encoder reads a user's history as flattened item codes (hard token ids or
soft code probabilities); the decoder generates the L tokens of the next item.
The network is HF ``T5ForConditionalGeneration`` built from a ``T5Config`` (no
pretrained weights), with ``decoder_start_token_id = PAD``. Its output projection (tied
to the token embedding) runs in fp32 (:class:`FP32OutputProjection`), so a bf16 model's
logits, loss and beam-search log-probabilities carry no bf16 rounding of the logits
(bf16 keeps 8 significant bits: neighbouring logits would tie).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from megarec.config import field
from megarec.data.code_vocab import CodeVocab


@dataclass
class T5RecConfig:
    num_layers: int = field(6, min=1, help="encoder layers")
    num_decoder_layers: int = field(6, min=1, help="decoder layers")
    d_model: int = field(128, min=1, help="model width")
    d_ff: int = field(512, min=1, help="feed-forward width")
    num_heads: int = field(4, min=1, help="attention heads")
    d_kv: int = field(32, min=1, help="width of each head's keys and values")
    dropout: float = field(0.1, min=0.0, max=1.0, help="dropout rate")
    feed_forward_proj: str = field("relu", choices=("relu", "gelu", "gated-gelu", "gated-relu"),
                                   help="T5 feed-forward activation")
    relative_attention_num_buckets: int = field(32, min=1)
    relative_attention_max_distance: int = field(128, min=1)
    scale_decoder_outputs: bool = field(True, help="scale decoder states by d_model^-0.5 before the output "
                                                   "projection (original T5; HF T5 always ties that projection "
                                                   "to the input embedding)")
    initializer_factor: float = field(1.0, min=0.0, help="T5 weight-init scale")


class FP32OutputProjection(nn.Linear):
    """A linear layer computed in fp32 whatever the dtype of its input and weight (and with
    autocast off): logits of a bf16 model are ``fp32(hidden) @ fp32(W)^T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def _fp32_head(head: nn.Linear) -> FP32OutputProjection:
    """The same projection (the same, possibly tied, parameter) as :class:`FP32OutputProjection`."""
    out = FP32OutputProjection(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    out.weight = head.weight
    if head.bias is not None:
        out.bias = head.bias
    return out


class GenerativeRecommender(nn.Module):
    """T5 seq2seq over a :class:`CodeVocab` (TIGER Sec. 3.2; soft inputs: UniGRec Eq. 15)."""

    def __init__(self, cfg: T5RecConfig, vocab: CodeVocab) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab
        # transformers 5 reads ``tie_word_embeddings=False`` as "do not scale decoder outputs"
        # (T5 v1.1 compatibility) and ties the output projection either way.
        t5cfg = T5Config(
            vocab_size=vocab.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
            num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=cfg.relative_attention_max_distance,
            dropout_rate=cfg.dropout, feed_forward_proj=cfg.feed_forward_proj,
            initializer_factor=cfg.initializer_factor, tie_word_embeddings=cfg.scale_decoder_outputs,
            pad_token_id=vocab.PAD, eos_token_id=vocab.EOS, decoder_start_token_id=vocab.PAD,
        )
        self.t5 = T5ForConditionalGeneration(t5cfg)
        self.t5.lm_head = _fp32_head(self.t5.lm_head)     # still tied to the token embedding

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding shared by encoder and decoder."""
        return self.t5.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor | None = None, soft_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, T, d]``: lookup for ids, ``probs @ E`` for soft inputs (UniGRec Eq. 15).

        ``soft_inputs`` is ``[B, T, V]``: a distribution over the whole vocabulary per
        position (see :meth:`CodeVocab.scatter_level_probs`). A one-hot row gives
        exactly the embedding lookup of its token.
        """
        if (input_ids is None) == (soft_inputs is None):
            raise ValueError("give exactly one of input_ids and soft_inputs")
        weight = self.embedding.weight
        if input_ids is not None:
            return self.embedding(input_ids)
        if soft_inputs.shape[-1] != weight.shape[0]:
            raise ValueError(f"soft_inputs must be [..., vocab_size={weight.shape[0]}], got {tuple(soft_inputs.shape)}")
        return soft_inputs.to(weight.dtype) @ weight

    def encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, *,
               soft_inputs: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        """Run only the encoder; the result can be passed as ``encoder_outputs`` (beam search reuses it)."""
        return self.t5.get_encoder()(inputs_embeds=self.embed(input_ids, soft_inputs),
                                     attention_mask=attention_mask, **kwargs)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, *, soft_inputs: torch.Tensor | None = None,
                decoder_soft_inputs: torch.Tensor | None = None,
                encoder_outputs: BaseModelOutput | None = None, **kwargs) -> Seq2SeqLMOutput:
        """Teacher-forced pass.

        - ``input_ids [B, T]`` token ids, or ``None`` with ``soft_inputs [B, T, V]``;
          ``attention_mask [B, T]`` (1 = token, 0 = padding).
        - ``labels [B, L]``: the target item's tokens (``-100`` = ignored). The decoder
          reads ``[PAD, y_1 .. y_{L-1}]``; ``loss`` is the mean token cross-entropy.
        - ``decoder_soft_inputs [B, L, V]``: soft target tokens; the decoder then reads
          ``[PAD, p_1 .. p_{L-1}] @ E`` (UniGRec Eq. 15 on the decoder side); ``labels``
          still give the loss.
        - extra keyword arguments go to HF T5 (``output_hidden_states=True`` returns
          ``decoder_hidden_states``; ``encoder_outputs`` skips the encoder).

        Returns HF ``Seq2SeqLMOutput`` (``loss``, ``logits [B, L, V]``, ``encoder_last_hidden_state``, ...).
        """
        if encoder_outputs is None:
            inputs_embeds = self.embed(input_ids, soft_inputs)
        else:
            inputs_embeds = None
        decoder_inputs_embeds = None
        if decoder_soft_inputs is not None:
            start = self.vocab.one_hot(torch.full_like(decoder_soft_inputs[:, :1, 0], self.vocab.PAD, dtype=torch.long))
            shifted = torch.cat([start.to(decoder_soft_inputs.dtype), decoder_soft_inputs[:, :-1]], dim=1)
            decoder_inputs_embeds = self.embed(soft_inputs=shifted)
        return self.t5(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       encoder_outputs=encoder_outputs, decoder_inputs_embeds=decoder_inputs_embeds, **kwargs)

    @torch.no_grad()
    def sequence_log_probs(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                           item_tokens: torch.Tensor, *, soft_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(item | history)`` for every (user, item) pair by teacher forcing: ``[B, N]``.

        Sum over levels of the full-vocabulary log-softmax of each item token. This is
        the exhaustive reference that beam search approximates; cost O(B * N) decoder
        passes, so use it on small catalogues (tests, diagnostics).
        """
        enc = self.encode(input_ids, attention_mask, soft_inputs=soft_inputs)
        hidden = enc.last_hidden_state
        b, n = hidden.shape[0], item_tokens.shape[0]
        item_tokens = item_tokens.to(hidden.device)
        labels = item_tokens.unsqueeze(0).expand(b, n, -1).reshape(b * n, -1)
        out = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n, dim=0)),
                      attention_mask=attention_mask.repeat_interleave(n, dim=0),
                      decoder_input_ids=self.t5._shift_right(labels))
        logp = out.logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp.sum(-1).view(b, n)
