"""Presets shipped with the package: ``megarec/configs/<method>/<profile>.yaml``.

A profile is a (nested) mapping of ``train_rec.py`` config keys, applied on top of the
defaults and below the user's config file and command-line overrides. Its optional
top-level ``stages:`` mapping holds the settings of the stages a method's pipeline
runs before training (e.g. ``stages: {tokenizer: {epochs: 300}}`` for TIGER's RQ-VAE);
they are handed to :meth:`~megarec.methods.base.Method.prepare_inputs`.

Profiles: ``paper`` (the papers' settings; GPUs), ``cpu-small`` (a 2-core CPU, real
data), ``quickstart`` (the embedded sample, about a minute per method), ``tiny``
(tests: seconds, not quality).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megarec.config import ConfigError, read_yaml_mapping

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STANDARD = ("paper", "cpu-small", "quickstart", "tiny")


@dataclass
class Profile:
    method: str
    name: str
    path: Path
    rec: dict[str, Any]                                      # train_rec.py keys
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline stage -> its keys


def profile_names(method: str) -> list[str]:
    """The profiles shipped for ``method`` (standard ones first)."""
    found = sorted(p.stem for p in (CONFIG_DIR / method).glob("*.yaml"))
    return [n for n in STANDARD if n in found] + [n for n in found if n not in STANDARD]


def load_profile(method: str, name: str) -> Profile:
    """Read ``megarec/configs/<method>/<name>.yaml`` (ConfigError listing the choices if absent)."""
    path = CONFIG_DIR / method / f"{name}.yaml"
    if not path.is_file():
        have = profile_names(method)
        raise ConfigError(f"profile {name!r} has no settings for method {method!r}; "
                          f"choose from {', '.join(have) if have else '(none shipped)'}")
    data = dict(read_yaml_mapping(path))
    stages = data.pop("stages", {}) or {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ConfigError(f"{path}: 'stages' must map a stage name to a mapping of its keys")
    return Profile(method, name, path, data, stages)


def flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]`` (lists and scalars are leaves)."""
    out: list[tuple[str, Any]] = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out
