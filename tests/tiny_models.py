"""Tiny random models saved to disk, for testing real `from_pretrained(path)` loading offline."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

WORDS = ("red blue green black white lamp cable tape steel glue box kit long short wide thin "
         "metal paper plastic wood glass round flat big small").split()


def save_tiny_bert(path: Path, words: Sequence[str] = WORDS) -> Path:
    """A 1-layer, 16-wide random BERT and a word-level tokenizer over ``words``, saved under ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    return path


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]


def _sample_texts() -> list[str]:
    import json

    from megarec.data.sample import DOMAINS, SAMPLE_DIR

    texts = []
    for d in DOMAINS:
        items = json.loads((SAMPLE_DIR / d / f"{d}.item.json").read_text())
        texts += [" ".join(str(v) for v in it.values()) for it in items.values()]
    return texts


# Qwen2-VL-2B's sizes (config.json of Qwen/Qwen2-VL-2B-Instruct), for benchmarks from a config without weights.
QWEN2VL_2B_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True)
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)


def save_qwen2vl_config(path: Path, text: dict | None = None, vision: dict | None = None,
                        image_pixels: tuple[int, int] = (28 * 28, 224 * 224), tokenizer_size: int | None = None) -> Path:
    """A Qwen2-VL folder without weights: config.json (default Qwen2-VL-2B's sizes), the word-level tokenizer and
    image processor of :func:`save_tiny_qwen2vl`; load it with ``utgrec.encoder.random_init true``.
    ``tokenizer_size``: pad the tokenizer's vocabulary with filler words to that many tokens (Qwen2-VL's
    151,646 makes the text decoder's output layer its real size)."""
    from transformers import Qwen2VLConfig

    fast = _tiny_qwen_tokenizer(path, 400, image_pixels, tokenizer_size)
    ids = fast.convert_tokens_to_ids
    t = dict(QWEN2VL_2B_TEXT if text is None else text)
    t.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    Qwen2VLConfig(text_config=dict(t, bos_token_id=None, eos_token_id=ids("<|im_end|>")),
                  vision_config=dict(QWEN2VL_2B_VISION if vision is None else vision),
                  image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>")).save_pretrained(path)
    return path


def _tiny_qwen_tokenizer(path: Path, vocab_size: int, image_pixels: tuple[int, int], pad_to: int | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_sample_texts(), trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                                       special_tokens=["<unk>"] + QWEN_SPECIALS))
    if pad_to is not None and pad_to > tok.get_vocab_size():
        vocab = tok.get_vocab()
        vocab.update({f"w{i}": i for i in range(len(vocab), pad_to)})
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIALS[1:])
    fast.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=image_pixels[0], max_pixels=image_pixels[1], patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(path)
    return fast


def save_tiny_qwen2vl(path: Path, vocab_size: int = 400, hidden: int = 32, image_pixels: tuple[int, int] = (28 * 28, 56 * 56)) -> Path:
    """A 2-layer, ``hidden``-wide random Qwen2-VL (1 vision block) with a word-level tokenizer trained on the
    embedded sample's item texts (Qwen2-VL's special tokens added) and a ``Qwen2VLImageProcessor`` with small
    min/max pixels, saved under ``path`` the way a hub Qwen2-VL folder is (config, weights, tokenizer,
    preprocessor_config.json), so ``from_pretrained(path)`` loads it like Qwen2-VL-2B."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    fast = _tiny_qwen_tokenizer(path, vocab_size, image_pixels)
    ids = fast.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    return path


def save_tiny_vae(path: Path) -> Path:
    """A tiny random diffusers ``AutoencoderKL`` (2 blocks: downsampling 2, 4 latent channels) saved under ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32, mid_block_add_attention=False).save_pretrained(path)
    return path
