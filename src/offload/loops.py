"""Which event loop offload's own loops run on: the worker's, beat's and the portal's.

uvloop, when installed (``pip install 'offload[fast]'``, part of ``[all]``), runs the same
asyncio code on libuv: its socket reads, timers and cross-thread wake-ups cost less CPU, and a
worker spends most of its own CPU on exactly those. ``auto`` picks it when it can be imported,
as uvicorn's ``--loop auto`` does; ``asyncio`` keeps the standard loop. The choice comes from
the worker's and beat's ``--loop`` option, else from ``OFFLOAD_LOOP``, else ``auto``.

A loop that offload does not create (a web server's, a test's) is never touched: the sync face
runs in its own thread (see `_portal`), and ``await task.adelay()`` runs on whatever loop calls it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from offload.errors import ConfigError

T = TypeVar("T")
LoopName = Literal["auto", "asyncio", "uvloop"]
LOOP_NAMES: tuple[str, ...] = get_args(LoopName)
LOOP_ENV = "OFFLOAD_LOOP"


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return, unused-ignore]


def loop_factory(name: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function that makes a new loop of the kind asked for (``None``: ``OFFLOAD_LOOP``, else auto)."""
    chosen = name or os.environ.get(LOOP_ENV) or "auto"
    if chosen not in LOOP_NAMES:
        raise ConfigError(f"unknown event loop {chosen!r}: use one of {', '.join(LOOP_NAMES)}")
    if chosen == "asyncio":
        return asyncio.new_event_loop
    factory = _uvloop_factory()
    if factory is not None:
        return factory
    if chosen == "uvloop":
        raise ConfigError("the uvloop event loop is not installed: pip install 'offload[fast]'")
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: str | None = None) -> T:
    """`asyncio.run` on the chosen loop."""
    try:
        factory = loop_factory(loop)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a loop is, for logs."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
