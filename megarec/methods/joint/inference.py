"""Loading a trained joint model for ``megarec recommend``: the codes it was selected with (its
``item_codes`` buffer) and its T5 behind trie-constrained beam search."""
from __future__ import annotations

import numpy as np
import torch

from megarec.data.code_vocab import CodeVocab
from megarec.data.codes import CodesFile
from megarec.data.domain import DataError, MultiDomain
from megarec.recommender.beam_recommender import BeamRecommender
from megarec.recommender.t5 import GenerativeRecommender, T5RecConfig


def trained_codes(state: dict[str, torch.Tensor], multi: MultiDomain, collisions: str, collision_codes: int,
                  method: str) -> CodesFile:
    """The codes a trained joint model was selected with (its ``item_codes`` buffer) as a codes file; the
    vocabulary is its tokenizer's codebooks plus, with the ``dedup`` policy, the collision level."""
    if "item_codes" not in state:
        raise DataError(f"the trained model has no item_codes: not a {method} model")
    codes = state["item_codes"].long().numpy()
    if len(codes) != multi.num_items:
        raise DataError(f"the model holds codes for {len(codes)} items, the data has {multi.num_items}")
    levels = sum(1 for k in state if k.startswith("tokenizer.quantizer.codebook_"))
    sizes = [int(state[f"tokenizer.quantizer.codebook_{i}"].shape[0]) for i in range(levels)]
    dedup = collisions == "dedup"
    return CodesFile(multi.item_keys(), codes, sizes + ([collision_codes] if dedup else []), dedup_level=dedup,
                     stats={"source": method, "codes_epoch": int(state.get("codes_epoch", torch.tensor(-1)))})


def trained_recommender(t5: T5RecConfig, state: dict[str, torch.Tensor], codes: CodesFile, candidates: np.ndarray,
                        max_len: int, beam_size: int) -> BeamRecommender:
    """The trained T5 (the ``recommender.*`` weights of ``state``) ranking by trie-constrained beam search
    over ``codes``."""
    from megarec.engine.checkpoint import load_state_dict_into

    vocab = CodeVocab(codes.codebook_sizes)
    model = GenerativeRecommender(t5, vocab)
    prefix = "recommender."
    load_state_dict_into(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                         source="the trained model")
    return BeamRecommender(model, candidates, vocab.item_tokens(codes.codes), max_len, beam_size)
