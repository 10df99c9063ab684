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
