"""The UTGRec tokenizer's export folder (``run_dir/model/``): the trainable part, apart from the frozen base.

- ``adapter_model.safetensors`` + ``adapter_config.json``: the content encoder's LoRA and code-token rows
  in peft's own format (``PeftModel.from_pretrained(base, folder)`` loads them onto the base model);
- ``model.safetensors``: every other tensor the tokenizer owns (code-token rows, MLP adapter, codebooks
  ``W`` / ``E``, projection, text and image decoders, trained base layers such as a vision tower trained
  with ``encoder.train_vision``), format ``megarec-utgrec-tokenizer/2``; no frozen base weight;
- ``config.yaml``: the run config (``utgrec.encoder.path`` names the base).

Fine-tuning and re-export (``train.init_from``) rebuild the base from ``utgrec.encoder.path`` and read only
these files. Older exports (``megarec-utgrec-tokenizer/1``: one ``model.safetensors`` with the base inside)
still load: only the tokenizer's own entries are read from them.

Both directions are collectives under ZeRO-3: parameters are gathered one at a time and rank 0 writes.
"""
from __future__ import annotations

from pathlib import Path
import torch
from torch import nn

from megarec.data.domain import DataError

FORMAT = "megarec-utgrec-tokenizer/2"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ENCODER_PREFIX = "encoder.model."   # the peft-wrapped backbone inside UTGRecModel


def _is_adapter(name: str) -> bool:
    """Entries peft saves: the LoRA matrices and the code-token rows (``trainable_tokens_delta``)."""
    return ".lora_" in name or "trainable_tokens_delta" in name


def split_names(module: nn.Module) -> tuple[list[str], list[str]]:
    """``(tokenizer entries, adapter entries)`` of ``module``'s state dict: the adapter entries go to peft's
    files, the tokenizer entries (code-token rows included) to ``model.safetensors``; the rest, the frozen
    base, is not exported."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    tok, ada = [], []
    for name in module.state_dict(keep_vars=True):
        if not name.startswith(ENCODER_PREFIX):
            tok.append(name)
            continue
        if _is_adapter(name):
            ada.append(name)
        if "trainable_tokens_delta" in name or (name in trainable and ".lora_" not in name):
            tok.append(name)
    return tok, ada


def _peft_names(peft_model: nn.Module, own: list[str]) -> dict[str, str]:
    """own state-dict name (under ``encoder.model.``) -> the name peft writes in ``adapter_model.safetensors``,
    found by running peft's own key conversion on tagged placeholders."""
    from peft import get_peft_model_state_dict

    rel = [n[len(ENCODER_PREFIX):] for n in own]
    tagged = {r: torch.tensor([float(i)]) for i, r in enumerate(rel)}
    out = get_peft_model_state_dict(peft_model, state_dict=tagged, save_embedding_layers=False)
    return {own[int(v.item())]: k for k, v in out.items()}


def export_tokenizer(module: nn.Module, folder: str | Path, metadata: dict[str, str]) -> None:
    """Collective: write the export folder's weights (the module docstring) from ``module``
    (``UTGRecModel``, plain or ZeRO-3 partitioned)."""
    from megarec.distributed import barrier, is_main_process
    from megarec.engine.checkpoint import gather_state_dict, save_safetensors

    tok, ada = split_names(module)
    state = gather_state_dict(module, tok + ada)
    if is_main_process():
        folder = Path(folder)
        peft_model = module.encoder.model
        names = _peft_names(peft_model, ada)
        peft_state = {n[len(ENCODER_PREFIX):]: state[n] for n in ada}
        if len(set(names.values())) != len(ada):
            raise RuntimeError(f"peft's adapter names do not map one to one onto the model's ({len(ada)} entries)")
        peft_model.save_pretrained(str(folder), state_dict=peft_state, save_embedding_layers=False,
                                   safe_serialization=True)
        save_safetensors({n: state[n] for n in tok}, folder / "model.safetensors", {**metadata, "format": FORMAT})
    barrier()


def read_tokenizer(module: nn.Module, source: str | Path) -> dict[str, torch.Tensor]:
    """The tokenizer entries and adapter entries of ``module`` (names of its state dict) from ``source``: an
    export folder, a run folder, its ``model.safetensors`` (this layout, or an older full export) or a
    DeepSpeed checkpoint. Reads only those entries. Clear error when some are missing."""
    from safetensors import safe_open

    from megarec.engine.checkpoint import read_weights, resolve_weights

    tok, ada = split_names(module)
    wanted = tok + ada
    own = set(module.state_dict(keep_vars=True))
    path = resolve_weights(source)
    state: dict[str, torch.Tensor] = {}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
                state = {k: fh.get_tensor(k) for k in wanted if k in keys}
        except Exception as e:
            raise DataError(f"{path}: not a safetensors file ({e})") from e
        foreign = sorted(keys - own)
        if foreign:
            raise DataError(f"{path} does not fit this tokenizer: {len(foreign)} unexpected entries "
                            f"{foreign[:5]} (another model or utgrec settings)")
        adapter = path.parent / ADAPTER_WEIGHTS
        if adapter.is_file():
            names = _peft_names(module.encoder.model, ada)
            with safe_open(str(adapter), framework="pt") as fh:
                keys = set(fh.keys())
                for n in ada:
                    if names.get(n) in keys:
                        state[n] = fh.get_tensor(names[n])
    else:
        full, _ = read_weights(path)
        state = {k: v for k, v in full.items() if k in set(wanted)}
    missing = [k for k in wanted if k not in state]
    if missing:
        hint = (f" (no {ADAPTER_WEIGHTS} next to {path.name}?)" if any(k in ada for k in missing) and path.is_file()
                else "")
        raise DataError(f"{source}: {len(missing)} of the tokenizer's trained entries are missing, e.g. "
                        f"{missing[:3]}{hint}")
    return state


def load_tokenizer(module: nn.Module, source: str | Path) -> None:
    """Collective: :func:`read_tokenizer` into ``module`` (the base stays as built from its model path)."""
    from megarec.engine.checkpoint import load_state_dict_into

    state = read_tokenizer(module, source)
    load_state_dict_into(module, state, source=str(source), keys=list(state))


def base_entries(module: nn.Module) -> list[str]:
    """The state-dict entries that no export holds (the frozen base)."""
    tok, ada = split_names(module)
    keep = set(tok) | set(ada)
    return [n for n in module.state_dict(keep_vars=True) if n not in keep]
