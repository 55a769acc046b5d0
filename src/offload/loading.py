"""Find an app from a ``module:attribute`` string (or a module holding ``app``)."""

from __future__ import annotations

import importlib
import os
import sys

from offload.app import Offload
from offload.errors import ConfigError


def load_app(spec: str) -> Offload:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigError(f"APP must be 'module:attribute' or a module holding 'app', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"cannot import {module_name!r}: no such module (is the current directory right?)") from None
        raise
    obj = module
    for part in (attr or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr or 'app'!r}") from None
    if callable(obj) and not isinstance(obj, Offload):
        obj = obj()  # a factory function
    if not isinstance(obj, Offload):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}, not an offload.Offload app")
    obj.spec = f"{module_name}:{attr or 'app'}"
    return obj
