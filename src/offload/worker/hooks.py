"""@app.on_worker_start hooks: run once per worker process (per child with the process pool)."""

from __future__ import annotations

import asyncio
import inspect

from offload.app import Offload


async def run_start_hooks(app: Offload) -> None:
    for hook in app.worker_start_hooks:
        value = hook()
        if inspect.isawaitable(value):
            await value


def run_start_hooks_sync(app: Offload) -> None:
    for hook in app.worker_start_hooks:
        value = hook()
        if inspect.isawaitable(value):
            asyncio.run(value)  # type: ignore[arg-type]
