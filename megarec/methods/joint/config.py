"""The config fields both joint methods' sections share (``etegrec:``, ``unigrec:``): the T5 and how codes
are regenerated from the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megarec.config import field
from megarec.recommender.t5 import T5RecConfig


@dataclass
class JointCodesConfig:
    section: ClassVar[str] = ""   # the run-config section a subclass is (error messages name its keys)

    t5: T5RecConfig = field(default_factory=T5RecConfig)
    tokenizer: str = field("", help="RQ-VAE folder, the tokenizer's initial weights: ETEGRec's hard one pre-trained on "
                                    "the teacher's item embeddings (`megarec train-tokenizer --embeddings`), UniGRec's "
                                    "soft one from stage 1 on the item text (`--rqvae.quantizer soft`); empty = the "
                                    "pipeline's tokenizer stage trains it")
    collisions: str = field("dedup", choices=("dedup", "utgrec"),
                            help="collision policy when codes are regenerated: dedup = one more level holding the "
                                 "item's index among identical IDs (the paper, after TIGER); utgrec = move colliding "
                                 "last codes to the nearest free code")
    collision_codes: int = field(256, min=1, help="dedup: size of the extra level (fixed, so the vocabulary never "
                                                  "changes; more identical IDs than this is an error)")
    codes_batch_size: int = field(4096, min=1, help="items per batch when codes are regenerated")
