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

Under a ZeRO-3 DeepSpeed config (``ds_config``) the backbone is built partitioned from the first byte:
``HfDeepSpeedConfig`` is alive during ``from_pretrained`` (transformers then loads inside
``deepspeed.zero.Init``), a ``random_init`` build runs inside ``deepspeed.zero.Init``, and the embedding
resize and peft's code-token rows gather only the embedding table. No rank holds the whole frozen base.

``H`` is the last hidden state at the L code positions. ``prepare(texts, images)``
builds CPU input tensors (call it outside ``forward``, e.g. in the data path);
``forward(**inputs)`` returns ``H``. ``text_targets(texts)`` tokenises item text
for the text decoder (Eq. 8) with the same tokenizer.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def local_only(path: str) -> dict[str, bool]:
    """``from_pretrained`` keywords for ``path``: a local folder never asks a hub (16 ranks of a SLURM job would
    otherwise each send look-ups at start-up, and an offline cluster waits for their time-outs)."""
    from pathlib import Path

    return {"local_files_only": True} if Path(path).is_dir() else {}


def code_tokens(num_codes: int) -> list[str]:
    return [f"<CODE_{l + 1}>" for l in range(num_codes)]


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3


@contextlib.contextmanager
def partitioned_build(ds_config: dict | None, from_config: bool) -> Iterator[Any]:
    """Under a ZeRO-3 ``ds_config``: keep ``transformers.integrations.HfDeepSpeedConfig`` alive for the block
    (``from_pretrained`` and ``resize_token_embeddings`` then partition / gather by themselves) and, for a
    build from a config (``from_config``), run it inside ``deepspeed.zero.Init``. Yields the
    ``HfDeepSpeedConfig`` (``None`` without ZeRO-3); the caller keeps it for as long as the model lives
    (transformers holds it through a weak reference only)."""
    if not is_zero3(ds_config):
        yield None
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(ds_config)
    linear = torch.nn.functional.linear   # zero.Init inside from_pretrained leaves DeepSpeed's F.linear behind
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config) if from_config else contextlib.nullcontext():
            yield hf
    finally:
        torch.nn.functional.linear = linear


def match_partitioned_dtype(model: nn.Module, ds_config: dict | None) -> None:
    """Under ZeRO-3 with bf16 / fp16: cast the floating parameters and buffers that were built whole (LoRA, the
    tokenizer's heads) to the precision of the partitioned ones. DeepSpeed casts a module only when nothing in it
    came from ``zero.Init``; here part of it did."""
    if not is_zero3(ds_config):
        return
    dtype = (torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") is True
             else torch.float16 if (ds_config.get("fp16") or {}).get("enabled") is True else None)
    if dtype is None:
        return
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def local_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` this rank holds (its ZeRO-3 partition, or the whole tensor)."""
    part = getattr(p, "ds_tensor", None)
    return int(part.numel()) if part is not None else int(p.numel())


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def _trainable_tokens_on_partitioned(emb: nn.Module) -> Iterator[None]:
    """peft reads the code-token rows of the input embedding when it builds ``trainable_token_indices``; under
    ZeRO-3 its own gather assumes a CUDA device. Gather the table here on every rank instead (the one full
    parameter, not the base) and let peft index it as an ordinary tensor."""
    w = emb.weight
    if not hasattr(w, "ds_id"):
        yield
        return
    import deepspeed
    from peft.tuners.trainable_tokens import layer as tt_layer

    saved = tt_layer.check_deepspeed_zero3_enabled
    tt_layer.check_deepspeed_zero3_enabled = lambda: False
    try:
        with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
            yield
    finally:
        tt_layer.check_deepspeed_zero3_enabled = saved


def _add_lora(model: nn.Module, code_ids: list[int], r: int, alpha: int, dropout: float, targets: str) -> nn.Module:
    """Wrap ``model`` with LoRA on modules matching ``targets`` (a regex on full module names) and train only the
    input-embedding rows ``code_ids``; every other base weight is frozen. Works on a ZeRO-3 partitioned model
    (the LoRA matrices are new, unpartitioned parameters: ``deepspeed.initialize`` partitions them)."""
    from peft import LoraConfig, get_peft_model

    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb).rsplit(".", 1)[-1]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not names:
        raise DataError(f"encoder.lora_target_modules {targets!r} matches no linear layer of the content encoder")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     trainable_token_indices={emb_name: list(code_ids)})
    with _trainable_tokens_on_partitioned(emb):
        return get_peft_model(model, cfg)


def _resize(model: nn.Module, n: int, ds_config: dict | None) -> None:
    """Grow the input embedding to ``n`` rows (Qwen's table has spare rows: usually a no-op). Under ZeRO-3 the
    size is read from ``ds_shape``, transformers gathers the old table itself while ``HfDeepSpeedConfig``
    lives, and the new table (which transformers allocates whole) is partitioned at once."""
    w = model.get_input_embeddings().weight
    partitioned = hasattr(w, "ds_shape")
    rows = int(w.ds_shape[0]) if partitioned else int(w.shape[0])
    if n <= rows:
        return
    # transformers' mean-initialisation of the new rows indexes the partitioned (1-D) shard under ZeRO-3: plain
    # init there (the code rows are trained from the start anyway)
    model.resize_token_embeddings(n, mean_resizing=not partitioned)
    if partitioned and not hasattr(model.get_input_embeddings().weight, "ds_id"):
        import deepspeed

        # mem_efficient_linear off: with ``module=`` DeepSpeed would otherwise swap F.linear for good
        deepspeed.zero.Init(module=model.get_input_embeddings(), config_dict_or_path=ds_config,
                            mem_efficient_linear=False)


def check_encoder_path(backend: str, path: str) -> None:
    """A clear error, before anything is built or computed, for an ``encoder.path`` that cannot be the model:
    a local folder that does not exist, lacks ``config.json`` or (``qwen2vl``) holds another architecture.
    Hub ids (``org/name``, not present locally) are left to ``from_pretrained``."""
    if backend == "text" and not path:
        return
    if backend == "qwen2vl" and not path:
        raise DataError("encoder.path: give a Qwen2-VL folder or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    p = Path(path).expanduser()
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if not looks_local:
        return
    if not p.is_dir():
        raise DataError(f"utgrec.encoder.path {path}: no such model folder")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise DataError(f"utgrec.encoder.path {path}: no config.json there (not a transformers model folder)")
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"utgrec.encoder.path {path}: config.json is not readable JSON ({e})") from e
    if backend == "qwen2vl" and kind != "qwen2_vl":
        raise DataError(f"utgrec.encoder.path {path}: a {kind!r} model, not Qwen2-VL (config.json model_type "
                        "'qwen2_vl'); backend 'text' takes other encoders")


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

    def register_zero3_params(self) -> int:
        """Under ZeRO-3, after ``deepspeed.initialize``: tell DeepSpeed that peft's code-token layer reads the
        embedding table and its own rows outside their modules' forward, so they are gathered whenever that
        layer runs, inside the engine's forward or not (the catalogue export, the k-means warm start: without
        it only an engine forward discovers them). Returns how many parameters were registered."""
        import deepspeed

        n = 0
        for m in self.model.modules():
            delta = getattr(m, "trainable_tokens_delta", None)
            if delta is None or not hasattr(m, "get_base_layer"):
                continue
            for p in [m.get_base_layer().weight, *delta.values()]:
                if hasattr(p, "ds_id"):
                    deepspeed.zero.register_external_parameter(m, p)
                    n += 1
        return n

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
                 max_text_tokens: int = 256, image_size: int = 224, gradient_checkpointing: bool = False,
                 ds_config: dict | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLModel

        self.num_codes, self.max_text_tokens, self.image_size = num_codes, max_text_tokens, image_size
        local = local_only(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **local)
        self.image_processor = AutoImageProcessor.from_pretrained(path, **local)
        self.tokenizer.add_tokens(code_tokens(num_codes), special_tokens=True)
        self.code_ids = self.tokenizer.convert_tokens_to_ids(code_tokens(num_codes))
        with partitioned_build(ds_config, from_config=random_init) as hf_ds:
            if random_init:  # device_check: a Qwen2-VL-2B-sized model from its config, no weights needed
                model = Qwen2VLModel(AutoConfig.from_pretrained(path, **local))
            else:
                model = Qwen2VLModel.from_pretrained(path, **local)
            _resize(model, len(self.tokenizer), ds_config)
        self._hf_ds_config = hf_ds   # transformers' zero-3 switch lives as long as this object
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = model.config.image_token_id
        self.merge = int(model.config.vision_config.spatial_merge_size)
        self._patch_dim = (3 * int(model.config.vision_config.temporal_patch_size)
                           * int(model.config.vision_config.patch_size) ** 2)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        with partitioned_build(ds_config, from_config=False):
            self.model = _add_lora(model, self.code_ids, lora_r, lora_alpha, lora_dropout,
                                   lora_targets or QWEN_LORA_TARGETS)
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
                 gradient_checkpointing: bool = False, ds_config: dict | None = None, **_: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from megarec.tokenizer.encoders import default_encoder_path

        path = path or str(default_encoder_path())
        self.num_codes, self.max_text_tokens = num_codes, max_text_tokens
        local = local_only(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **local)
        self.tokenizer.add_tokens(code_tokens(num_codes), special_tokens=True)
        self.code_ids = self.tokenizer.convert_tokens_to_ids(code_tokens(num_codes))
        config = AutoConfig.from_pretrained(path, **local)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, BACKBONE_DROPOUT)
        with partitioned_build(ds_config, from_config=random_init) as hf_ds:
            model = AutoModel.from_config(config) if random_init else AutoModel.from_pretrained(path, config=config, **local)
            _resize(model, len(self.tokenizer), ds_config)
        self._hf_ds_config = hf_ds
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with partitioned_build(ds_config, from_config=False):
            self.model = _add_lora(model, self.code_ids, lora_r, lora_alpha, lora_dropout,
                                   lora_targets or TEXT_LORA_TARGETS)

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
    check_encoder_path(backend, path) if backend in BACKENDS else None
    if backend == "qwen2vl":
        return QwenVLEncoder(path, num_codes, **kwargs)
    if backend == "text":
        kwargs.pop("train_vision", None), kwargs.pop("image_size", None)
        return TextEncoder(path, num_codes, **kwargs)
    raise DataError(f"encoder.backend must be one of {BACKENDS}, got {backend!r}")
