"""Calling the functions users and offload register: @app.on_worker_start hooks (once per
worker process, per child with the process pool) and outcome hooks (each final outcome of a
message with headers: workflows and Django's owned tasks listen there). A hook may be a plain
function or a coroutine function; they run in the order registered."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from typing import Any


async def call_each(hooks: Iterable[Callable[..., Any]], *args: Any) -> None:
    """Call every hook with ``args``, awaiting those that return an awaitable."""
    for hook in hooks:
        value = hook(*args)
        if inspect.isawaitable(value):
            await value


def call_each_sync(hooks: Iterable[Callable[..., Any]], *args: Any) -> None:
    """`call_each` outside any event loop (a process-pool child before its first task)."""
    for hook in hooks:
        value = hook(*args)
        if inspect.isawaitable(value):
            asyncio.run(_awaited(value))


async def _awaited(value: Any) -> None:
    await value
