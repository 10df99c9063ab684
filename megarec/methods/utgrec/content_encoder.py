"""Content encoders for UTGRec: item text (+ image) -> L code states ``H [B, L, d]`` (UTGRec Eq. 2).

Two backends share one interface (:class:`ContentEncoder`):

- :class:`QwenVLEncoder`: Qwen2-VL (``Qwen2VLModel``: vision tower + language model,
  *no* language-model head, so no full-vocabulary logits are ever computed) with
  LoRA on the language model's linear layers and L new tokens ``<CODE_1>..<CODE_L>``
  whose embedding rows alone are trained (peft ``trainable_token_indices``). The
  prompt is the paper's (Sec. 2.2.1), with a text-only variant for items without an
  image. Under ZeRO-3 the vision tower runs on every rank at every step, always
  before the language model: a batch without any image sends one dummy 2x2-patch
  image through it (its output enters the result with weight 0).
- :class:`TextEncoder`: any HF text encoder (default: the bundled all-MiniLM-L6-v2),
  item text followed by the L code tokens as a second segment; same LoRA and
  code-token treatment. Images are ignored. Runs the whole method on CPU.

``H`` is the last hidden state at the L code positions. ``prepare(texts, images)``
builds CPU input tensors (call it outside ``forward``, e.g. in the data path);
``forward(**inputs)`` returns ``H``. ``text_targets(texts)`` tokenises item text
for the text decoder (Eq. 8) with the same tokenizer.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn

from megarec.data.domain import DataError

IMAGE_PROMPT = ("<|vision_start|>{image}<|vision_end|>\nThis is an image of an item. The item's information also "
                "includes: \"{text}\". Compress the image and text information into {L} tokens, representing content "
                "from coarse to fine granularity.\n{codes}")
TEXT_PROMPT = ("The item's information is: \"{text}\". Compress the text information into {L} tokens, representing "
               "content from coarse to fine granularity.\n{codes}")
QWEN_LORA_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TEXT_LORA_TARGETS = r"encoder\..*\.(query|key|value|dense)"
BACKENDS = ("qwen2vl", "text")
# Dropout inside the text backend's frozen backbone (MiniLM ships 0.1): none, as in Qwen2-VL. Its noise in the
# code states exceeds their spread across items and, with it, the codes of a short CPU run collapse
# (docs/README_utgrec.md, "codes after short CPU training"); LoRA keeps its own lora_dropout.
BACKBONE_DROPOUT = 0.0


def code_tokens(num_codes: int) -> list[str]:
    return [f"<CODE_{l + 1}>" for l in range(num_codes)]


def _add_lora(model: nn.Module, code_ids: list[int], r: int, alpha: int, dropout: float, targets: str) -> nn.Module:
    """Wrap ``model`` with LoRA on modules matching ``targets`` (a regex on full module names) and train only the
    input-embedding rows ``code_ids``; every other base weight is frozen."""
    from peft import LoraConfig, get_peft_model

    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb).rsplit(".", 1)[-1]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not names:
        raise DataError(f"encoder.lora_target_modules {targets!r} matches no linear layer of the content encoder")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     trainable_token_indices={emb_name: list(code_ids)})
    return get_peft_model(model, cfg)


class ContentEncoder(nn.Module):
    """Common part: tokenizer with code tokens, LoRA-wrapped ``self.model``, gathering of code states."""

    tokenizer: Any
    num_codes: int
    max_text_tokens: int
    code_ids: list[int]

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _truncate(self, texts: Sequence[str]) -> list[str]:
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=self.max_text_tokens)["input_ids"]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def text_targets(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, T]`` of each item text (no special tokens, at most ``max_tokens``) and their mask."""
        return self.preparer().text_targets(texts, max_tokens)

    def code_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``H [B, L, d]``: ``hidden`` at the positions of ``<CODE_1>..<CODE_L>`` (once each per row).

        No host sync: positions by ``argmax`` and a gather (static shapes), the "exactly once" check by
        ``torch._assert_async`` (on a GPU it fails at a later kernel launch instead of draining the queue;
        on CPU it is an immediate check). The prompts put every code token once by construction
        (:meth:`prepare`)."""
        pos = []
        for cid in self.code_ids:
            hit = input_ids == cid
            torch._assert_async((hit.sum(1) == 1).all(), "every encoder input row must hold each code token exactly once")
            pos.append(hit.int().argmax(1))
        idx = torch.stack(pos, dim=1)                                   # [B, L]
        return hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


class QwenVLEncoder(ContentEncoder):
    """Qwen2-VL + LoRA (UTGRec Sec. 2.2.1); see the module docstring."""

    def __init__(self, path: str, num_codes: int, *, random_init: bool = False, lora_r: int = 8, lora_alpha: int = 32,
                 lora_dropout: float = 0.1, lora_targets: str = "", train_vision: bool = False,
                 max_text_tokens: int = 256, image_size: int = 224, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLModel

        self.num_codes, self.max_text_tokens, self.image_size = num_codes, max_text_tokens, image_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.tokenizer.add_tokens(code_tokens(num_codes), special_tokens=True)
        self.code_ids = self.tokenizer.convert_tokens_to_ids(code_tokens(num_codes))
        if random_init:  # device_check: a Qwen2-VL-2B-sized model from its config, no weights needed
            model = Qwen2VLModel(AutoConfig.from_pretrained(path))
        else:
            model = Qwen2VLModel.from_pretrained(path)
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:   # Qwen's table has spare rows
            model.resize_token_embeddings(len(self.tokenizer))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = model.config.image_token_id
        self.merge = int(model.config.vision_config.spatial_merge_size)
        self._patch_dim = (3 * int(model.config.vision_config.temporal_patch_size)
                           * int(model.config.vision_config.patch_size) ** 2)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        self.model = _add_lora(model, self.code_ids, lora_r, lora_alpha, lora_dropout, lora_targets or QWEN_LORA_TARGETS)
        for p in self._visual().parameters():
            p.requires_grad_(bool(train_vision))

    def _visual(self) -> nn.Module:
        return self.model.get_base_model().visual

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_base_model().config.text_config.hidden_size)

    def preparer(self):
        """The picklable :class:`~.item_inputs.ItemPreparer` of this encoder (tokenizer + image processor at
        ``image_size``), for DataLoader workers."""
        from megarec.methods.utgrec.item_inputs import ItemPreparer

        return ItemPreparer(self.tokenizer, self.num_codes, self.max_text_tokens, self.image_processor, self.image_size)

    def prepare(self, texts: Sequence[str], images: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Prompts (image variant where an image is given) -> input ids, mask, pixel values, image grids; images
        at ``image_size`` rounded to a multiple of 28 (:mod:`~.item_inputs`)."""
        return self.preparer().encoder_inputs(texts, images)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """``H [B, L, d]``. The vision tower always runs first, on this batch's images or on a dummy 2x2-patch
        image, and its features go into the model as ``mm_encoder_outputs``: every rank then calls the vision
        tower, the embeddings and the decoder layers in the same order (ZeRO-3 gathers parameters module by
        module in call order; ranks that disagree on the order hang or exchange the wrong tensors)."""
        base = self.model.get_base_model()
        if pixel_values is None:
            grid = torch.tensor([[1, self.merge, self.merge]], device=input_ids.device)
            dummy = torch.zeros(self.merge ** 2, self._patch_dim, device=input_ids.device)
            feats = base.get_image_features(dummy, grid, return_dict=True)
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            h = self.code_states(hidden, input_ids)
            return h + 0.0 * torch.cat(feats.pooler_output).float().sum().to(h.dtype)   # weight 0, same graph
        feats = base.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, image_grid_thw=image_grid_thw,
                            mm_token_type_ids=(input_ids == self.image_token_id).int(),
                            mm_encoder_outputs={"image": feats}).last_hidden_state
        return self.code_states(hidden, input_ids)


class TextEncoder(ContentEncoder):
    """Any HF text encoder (``AutoModel``) with LoRA and trained code-token rows; images are ignored."""

    def __init__(self, path: str, num_codes: int, *, random_init: bool = False, lora_r: int = 8, lora_alpha: int = 32,
                 lora_dropout: float = 0.1, lora_targets: str = "", max_text_tokens: int = 256,
                 gradient_checkpointing: bool = False, **_: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from megarec.tokenizer.encoders import default_encoder_path

        path = path or str(default_encoder_path())
        self.num_codes, self.max_text_tokens = num_codes, max_text_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.add_tokens(code_tokens(num_codes), special_tokens=True)
        self.code_ids = self.tokenizer.convert_tokens_to_ids(code_tokens(num_codes))
        config = AutoConfig.from_pretrained(path)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, BACKBONE_DROPOUT)
        model = AutoModel.from_config(config) if random_init else AutoModel.from_pretrained(path, config=config)
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = _add_lora(model, self.code_ids, lora_r, lora_alpha, lora_dropout, lora_targets or TEXT_LORA_TARGETS)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_base_model().config.hidden_size)

    def preparer(self):
        """The picklable :class:`~.item_inputs.ItemPreparer` of this encoder (its tokenizer), for DataLoader
        workers."""
        from megarec.methods.utgrec.item_inputs import ItemPreparer

        return ItemPreparer(self.tokenizer, self.num_codes, self.max_text_tokens)

    def prepare(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        return self.preparer().encoder_inputs(texts, None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.code_states(hidden, input_ids)


def build_content_encoder(backend: str, path: str, num_codes: int, **kwargs: Any) -> ContentEncoder:
    """``backend`` ``qwen2vl`` (:class:`QwenVLEncoder`) or ``text`` (:class:`TextEncoder`)."""
    if backend == "qwen2vl":
        if not path:
            raise DataError("encoder.path: give a Qwen2-VL folder or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
        return QwenVLEncoder(path, num_codes, **kwargs)
    if backend == "text":
        kwargs.pop("train_vision", None), kwargs.pop("image_size", None)
        return TextEncoder(path, num_codes, **kwargs)
    raise DataError(f"encoder.backend must be one of {BACKENDS}, got {backend!r}")
