"""Find an app from an APP string: ``module:attribute``, a module holding ``app``, or
``module:factory()`` for a function that builds the app.

Whatever goes wrong is a `ConfigError` of one line: the module is missing, it fails to import
(a syntax error, a missing dependency, an exception raised at import), or the attribute is not
an app. Only an ``Offload`` instance is taken as it is, and only a function named with ``()``
is called: an APP naming a task or any other function must never run it.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import Any

from offload.app import Offload
from offload.errors import ConfigError
from offload.task import Call, Signature, Task

FACTORY_SUFFIX = "()"


def load_app(spec: str) -> Offload:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigError(f"APP must be 'module:attribute' or a module holding 'app', got {spec!r}")
    attr = attr or "app"
    is_factory = attr.endswith(FACTORY_SUFFIX)
    path = attr.removesuffix(FACTORY_SUFFIX)
    obj: Any = _import(module_name)
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {path!r}") from None
    if is_factory:
        app = _call_factory(spec, obj)
    elif isinstance(obj, Offload):
        app = obj
    else:
        raise ConfigError(_not_an_app(spec, obj))
    # Process-pool children load the app again from this (a factory is called there too).
    app.spec = f"{module_name}:{attr}"
    return app


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"cannot import {module_name!r}: no such module (is the current directory right?)") from None
        raise ConfigError(f"cannot import {module_name!r}: {_describe(e)}") from None
    except Exception as e:  # the user's code failed while importing: say where, in one line
        raise ConfigError(f"cannot import {module_name!r}: {_describe(e)}") from None


def _call_factory(spec: str, factory: Any) -> Offload:
    if isinstance(factory, (Task, Call, Signature)) or not callable(factory):
        raise ConfigError(f"{spec!r} names a {type(factory).__name__}, not a function that returns an offload.Offload app")
    try:
        app = factory()
    except Exception as e:
        raise ConfigError(f"the app factory {spec!r} failed: {_describe(e)}") from None
    if not isinstance(app, Offload):
        raise ConfigError(f"the app factory {spec!r} returned {app!r:.80}, not an offload.Offload app")
    return app


def _not_an_app(spec: str, obj: Any) -> str:
    if isinstance(obj, Task):
        return f"{spec!r} is the task {obj.name!r}, not an app; APP names the Offload app (module:app)"
    if callable(obj):
        return (f"{spec!r} is a {type(obj).__name__}, not an offload.Offload app; to build the app by calling it, "
                f"write {spec + FACTORY_SUFFIX!r}")
    return f"{spec!r} is a {type(obj).__name__}, not an offload.Offload app"


def _describe(e: BaseException) -> str:
    """``Type: message (file, line N)`` on one line, at the innermost frame of the user's code."""
    if isinstance(e, SyntaxError):  # its str() already names the file and line
        text = f"{type(e).__name__}: {e}"
    else:
        frames = traceback.extract_tb(e.__traceback__)
        user = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<frozen")]
        where = f" ({user[-1].filename}, line {user[-1].lineno})" if user else ""
        text = f"{type(e).__name__}: {e}{where}"
    return " ".join(text.split())
