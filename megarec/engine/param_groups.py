"""Optimizer parameter groups: which parameters get weight decay, and per-part learning rates.

:func:`param_groups` splits a model's trainable parameters into AdamW groups:

- **no weight decay** (``weight_decay = 0``):

  - every parameter of a normalisation module (``nn.LayerNorm``, ``nn.RMSNorm``,
    ``nn.GroupNorm``, batch norms, and any module whose class name ends in ``LayerNorm`` or
    ``RMSNorm``, e.g. HF's ``T5LayerNorm``);
  - every parameter with fewer than two dimensions (biases, gains, learned scalars such as
    temperatures): decay on them does not regularise anything, it only pulls offsets and
    scales towards 0;
  - T5's ``relative_attention_bias`` tables (an ``nn.Embedding`` of bucket -> per-head bias:
    an additive bias, not a weight matrix);
  - token / item embeddings only when ``no_decay_embeddings=True``.

- **embeddings are decayed by default** (``no_decay_embeddings=False``). This is what HF's
  ``Trainer`` does and therefore what the TIGER / ETEGRec / UniGRec training codes do, so the
  default reproduces the papers. It is also sound for the models here: T5's token embedding
  is tied to the output projection (a weight matrix of the classifier), and a semantic-ID
  vocabulary is small (a few hundred to a few thousand tokens) with every row updated at
  almost every step, so decoupled decay does not starve rare rows. The argument for
  ``True`` is a large item-ID table with a long tail (SASRec over millions of items),
  where AdamW's decay shrinks rows that rarely receive a gradient; SASRec follows RecBole
  with ``weight_decay = 0`` anyway, so the flag only matters if someone turns decay on there.

- **learning-rate multipliers** (``lr_scales``): ``{"tokenizer.": 0.1}`` puts every parameter
  whose name starts with ``tokenizer.`` into groups of its own with ``lr_scale = 0.1``
  (longest matching prefix wins; the rest has scale 1). The joint methods (ETEGRec,
  UniGRec) train the tokenizer and the recommender with different learning rates this way.
  :func:`megarec.engine.deepspeed_setup.build_engine` turns ``lr_scale`` into each group's
  ``lr`` (ds config lr x scale); the warmup-cosine ``LambdaLR`` then scales every group's own
  base lr by the same factor.

Frozen parameters (``requires_grad=False``) are left out; a parameter shared by several
modules (tied weights) appears once. Every group carries a ``name`` (``"<prefix>decay"`` /
``"<prefix>no_decay"``, prefix ``""`` for the default part) for logs; empty groups are dropped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                                 nn.modules.instancenorm._InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)

NO_DECAY_NAMES = ("relative_attention_bias",)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's or a class named ``*LayerNorm`` / ``*RMSNorm``, e.g. ``T5LayerNorm``)."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith("LayerNorm") or name.endswith("RMSNorm")


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape, also of a ZeRO-3 partitioned parameter (whose ``.shape`` is its local slice)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _owner_kinds(model: nn.Module) -> dict[int, set[str]]:
    """``id(param) -> {"norm", "embedding"}`` over every module that owns it (tied weights: all owners)."""
    kinds: dict[int, set[str]] = {}
    for module in model.modules():
        kind = "norm" if is_norm(module) else "embedding" if isinstance(module, nn.Embedding) else None
        if kind is None:
            continue
        for p in module.parameters(recurse=False):
            kinds.setdefault(id(p), set()).add(kind)
    return kinds


def decays(name: str, p: torch.Tensor, kinds: set[str], no_decay_embeddings: bool) -> bool:
    """Whether parameter ``name`` gets weight decay (see the module docstring for the rules)."""
    if "norm" in kinds or len(_shape(p)) < 2:
        return False
    if any(part in name.split(".") for part in NO_DECAY_NAMES):
        return False
    if "embedding" in kinds and no_decay_embeddings:
        return False
    return True


def _scale_prefix(name: str, lr_scales: dict[str, float]) -> str:
    best = ""
    for prefix in lr_scales:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return best


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None,
                 no_decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters.

    Returns dicts ``{"params", "weight_decay", "lr_scale", "name"}``: for each lr part
    (the default part, then each prefix of ``lr_scales`` in the given order) a decayed and a
    non-decayed group, empty ones dropped. The groups partition the trainable parameters.
    """
    lr_scales = dict(lr_scales or {})
    for prefix, scale in lr_scales.items():
        if not prefix:
            raise ValueError("lr_scales: an empty prefix would match every parameter; scale the base lr instead")
        if not scale > 0:
            raise ValueError(f"lr_scales[{prefix!r}] must be > 0, got {scale}")
    kinds = _owner_kinds(model)
    parts = [""] + list(lr_scales)
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(p, d): [] for p in parts for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = decays(name, p, kinds.get(id(p), set()), no_decay_embeddings)
        buckets[(_scale_prefix(name, lr_scales), decay)].append(p)
    groups = []
    for prefix in parts:
        for decay in (True, False):
            params = buckets[(prefix, decay)]
            if params:
                groups.append({"params": params, "weight_decay": float(weight_decay) if decay else 0.0,
                               "lr_scale": float(lr_scales.get(prefix, 1.0)),
                               "name": f"{prefix}{'decay' if decay else 'no_decay'}"})
    return groups
