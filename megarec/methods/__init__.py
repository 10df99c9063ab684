"""Recommender methods as plug-ins (see :mod:`megarec.methods.base`).

``REGISTRY`` maps a method name to ``"module:Class"``; adding a method is one line
here, one module and its profile YAML files under ``megarec/configs/<method>/``.
Entry points and the trainer never test a method's name.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megarec.methods.base import Method

REGISTRY: dict[str, str] = {
    "sasrec": "megarec.methods.sasrec.plugin:SASRecMethod",
    "tiger": "megarec.methods.tiger.plugin:TigerMethod",
    "etegrec": "megarec.methods.etegrec.plugin:ETEGRecMethod",
    "unigrec": "megarec.methods.unigrec.plugin:UniGRecMethod",
    "utgrec": "megarec.methods.utgrec.plugin:UTGRecMethod",
}

DEFAULT_METHOD = "tiger"   # of a run config that names none


def load_plugin(registry: dict[str, str], name: str, kind: str):
    """An instance of the plug-in ``registry[name]`` (``"module:Class"``, imported only now); an unknown
    name is a ConfigError listing the registered ones."""
    from megarec.config import ConfigError

    if name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; choose from {', '.join(registry)}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)()


@lru_cache(maxsize=None)
def get_method(name: str) -> "Method":
    """The registered method ``name`` (a :class:`~megarec.methods.base.Method` instance)."""
    return load_plugin(REGISTRY, name, "method")


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)
