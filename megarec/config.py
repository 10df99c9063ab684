"""Dataclass configs: a YAML file plus ``--key value`` overrides, validated up front.

Every field may carry validation metadata through :func:`field`:

    lr: float = field(1e-3, min=0.0, help="peak learning rate")
    policy: str = field("skip", choices=("skip", "fail"))

Nested dataclasses are addressed with dotted keys (``--data.max_len 50``).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
with a message that names the key and lists the valid options.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


def field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          choices: Sequence[Any] | None = None, min: float | None = None, max: float | None = None,
          help: str = "") -> Any:
    """A dataclass field with validation metadata (choices, inclusive min/max, help)."""
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------
# Sections. Each stage owns one; methods add theirs next to them.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list, help="domain folders or files (see README: data formats)")
    max_len: int = field(20, min=1, help="history length cap (items)")
    text_fields: list[str] | None = field(None, help="item fields concatenated into the item text (none = the "
                                          "format's: title,brand,categories,description for the json layout, "
                                          "title,features,categories for raw Amazon 2023, every text column for RecBole)")
    kcore: int | None = field(None, min=0, help="k-core filtering (none = the format's: 5 for raw Amazon 2023, "
                                                "as read otherwise; 0 = as read)")
    max_users: int = field(0, min=0, help="keep at most this many users of each domain: a uniform random subset "
                                         "(fixed seed 0, the same for every run) with the items they use; for "
                                         "fitting a CPU budget (0 = every user)")


@dataclasses.dataclass
class ShardConfig:
    out: str = field("shards", help="output folder for item shards")
    max_count: int = field(10000, min=1, help="items per shard at most")
    max_size: int = field(256 * 1024 * 1024, min=1024, help="bytes per shard at most")
    on_bad_sample: str = field("skip", choices=("skip", "fail"), help="corrupt member or undecodable image")
    shuffle_buffer: int = field(1000, min=0, help="shuffle buffer size (0 = no shuffling)")
    batch_size: int = field(64, min=1)
    num_workers: int = field(0, min=0)


@dataclasses.dataclass
class RQVAEConfig:
    """RQ-VAE tokenizer: MLP encoder/decoder around residual codebooks (ETEGRec Eqs. 3-10, UniGRec Eqs. 14-17)."""
    hidden: list[int] = field(default_factory=lambda: [512, 256, 128], min=1,
                              help="encoder MLP widths between input and code_dim (the decoder mirrors them)")
    code_dim: int = field(32, min=1, help="codebook vector dimension d_c")
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256], min=1,
                                      help="codes per level, one entry per level (the ID length)")
    quantizer: str = field("hard", choices=("hard", "soft"),
                           help="hard: nearest code + straight-through + RQ loss; soft: UniGRec soft identifiers")
    beta: float = field(0.25, min=0.0, help="commitment weight (ETEGRec Eq. 10)")
    dropout: float = field(0.0, min=0.0, max=0.99, help="dropout between MLP layers")
    kmeans_init: bool = field(True, help="initialise codebooks by k-means on the first batches")
    kmeans_iters: int = field(25, min=0, help="Lloyd iterations of the k-means initialisation")
    dead_code_steps: int = field(200, min=0, help="re-seed codes unused for this many steps (0 = never)")
    tau_max: float = field(0.05, min=1e-8, help="soft: initial temperature (UniGRec Eq. 16)")
    tau_min: float = field(0.001, min=1e-8, help="soft: final temperature (UniGRec Eq. 16)")
    uniformity_weight: float = field(1e-4, min=0.0, help="soft: lambda_CU, weight of the uniformity loss (UniGRec "
                                                         "Eq. 21, paper 1e-4), relative to recon")
    init: str = field("auto", choices=("auto", "xavier", "torch"),
                      help="MLP weight init: xavier = xavier-normal weights, zero biases (the public UniGRec/TIGER "
                           "RQ-VAE code); torch = PyTorch's default; auto = xavier for soft, torch for hard. The "
                           "soft quantiser's tau is on the scale of squared latent distances, which the init sets")
    recon: str = field("auto", choices=("auto", "mean", "sum"),
                       help="reduction of ||z - z~||^2 over dimensions: sum (ETEGRec Eq. 9) or mean (the public "
                            "UniGRec code's MSE, the scale its lambda_CU = 1e-4 is tuned to); auto = mean for "
                            "soft, sum for hard")

    def check(self) -> None:
        if self.tau_min > self.tau_max:
            raise ConfigError(f"rqvae.tau_min ({self.tau_min}) must not exceed rqvae.tau_max ({self.tau_max})")


@dataclasses.dataclass
class TokenizerConfig:
    """``megarec train-tokenizer``: inputs, RQ-VAE, optimisation and code assignment."""
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    encoder: str = field("", help="HF encoder for item text (path or folder; empty = bundled all-MiniLM-L6-v2)")
    text_fields: list[str] | None = field(None, help="item fields forming the text (none = the domain's)")
    max_text_length: int = field(256, min=8, help="encoder tokens per item text")
    encoder_batch_size: int = field(64, min=1)
    normalize: bool = field(True, help="L2-normalise text embeddings (as sentence-transformers does for MiniLM)")
    epochs: int = field(500, min=1, help="passes over the catalogue (3 x 256 on 4k items: a few CPU minutes)")
    batch_size: int = field(1024, min=1)
    lr: float = field(1e-3, min=0.0)
    weight_decay: float = field(0.0, min=0.0)
    kmeans_samples: int = field(4096, min=1, help="items (first shuffled batches) used for k-means init")
    eval_every: int = field(100, min=1, help="epochs between catalogue code statistics")
    collisions: str = field("utgrec", choices=("utgrec", "dedup", "none"),
                            help="utgrec: move colliding last codes to the nearest free code; "
                                 "dedup: TIGER's extra level; none: keep collisions")
    seed: int = field(0, min=0)
    device: str = field("auto", choices=("auto", "cpu", "cuda"))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, from_string: bool) -> Any:
    """Check (and for CLI strings, parse) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if from_string and value in ("none", "None", "null"):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, from_string)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin in (list, tuple):
        (inner,) = args[:1] or (Any,)
        if from_string and isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner, from_string) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_string and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _validate_field(key: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if choices is not None and v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(repr, choices))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and v < lo:
                raise ConfigError(f"{key}: {v} is below the minimum {lo}")
            if hi is not None and v > hi:
                raise ConfigError(f"{key}: {v} is above the maximum {hi}")


def _set(obj: Any, dotted: str, value: Any, from_string: bool, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    full = f"{prefix}{head}"
    if head not in fields:
        raise ConfigError(f"unknown key {full!r}; valid keys: {', '.join(sorted(prefix + k for k in fields))}")
    f = fields[head]
    tp = _hints(type(obj))[head]
    if _is_dataclass_type(tp):
        if rest:
            _set(getattr(obj, head), rest, value, from_string, prefix=f"{full}.")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of {', '.join(x.name for x in dataclasses.fields(tp))}")
        for k, v in value.items():
            _set(getattr(obj, head), str(k), v, from_string, prefix=f"{full}.")
        return
    if rest:
        raise ConfigError(f"unknown key {full}.{rest!r}: {full!r} has no sub-keys")
    coerced = _coerce(full, value, tp, from_string)
    _validate_field(full, f, coerced)
    setattr(obj, head, coerced)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` (recursively) against its type and metadata."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            validate(value, prefix=f"{key}.")
        else:
            _validate_field(key, f, _coerce(key, value, hints[f.name], from_string=False))
    post = getattr(cfg, "check", None)
    if callable(post):
        post()


def override_value(v: Any) -> str:
    """A YAML value (e.g. a profile's stage setting) as the ``--key value`` string that :func:`load_config`
    parses back (lists as ``a,b,c``)."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """Turn ``["--a.b", "1", "--c=2"]`` into ``[("a.b", "1"), ("c", "2")]``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"expected --key value, got {tok!r}")
        tok = tok[2:]
        if "=" in tok:
            k, v = tok.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{tok} needs a value")
            k, v = tok, argv[i + 1]
            i += 2
        pairs.append((k.replace("-", "_"), v))
    return pairs


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (ConfigError naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def apply_mapping(cfg: Any, data: dict[str, Any], source: str) -> None:
    """Set the (nested) keys of ``data`` on ``cfg``; errors name ``source``."""
    for k, v in data.items():
        try:
            _set(cfg, str(k), v, from_string=False)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | Sequence[tuple[str, str]] = (),
                base: Sequence[tuple[str, dict[str, Any]]] = ()) -> T:
    """Build ``cls`` from, in increasing precedence: defaults, ``base`` layers (``(source name,
    mapping)``, e.g. a profile), the YAML file ``path``, then ``--key value`` overrides."""
    cfg = cls()
    for source, data in base:
        apply_mapping(cfg, data, source)
    if path is not None:
        apply_mapping(cfg, read_yaml_mapping(path), str(path))
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)  # type: ignore[arg-type]
    for k, v in overrides:  # type: ignore[misc]
        _set(cfg, k, v, from_string=True)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
