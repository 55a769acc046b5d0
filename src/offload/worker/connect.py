"""Reaching the broker and the result store at start-up.

A broker that cannot be reached is tried again with backoff and a warning each time, for up to
the worker's connect timeout; a stop request ends the wait at once. A daemon waits as long as
it takes (its supervisor expects that rather than an exit); a burst worker gives up and says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Any

from offload.app import Offload
from offload.brokers import Backends
from offload.errors import BrokerUnavailable
from offload.retrying import Backoff

log = logging.getLogger("offload.worker")

# A broker unreachable at start-up is tried again after about 0.5, 1, 2, 4, 8, then 10 s (each
# +-25 %, so that workers started together do not knock together).
CONNECT_BACKOFF = Backoff(first_s=0.5, cap_s=10.0, jitter=True, spread=(0.75, 1.25))
# How long a burst worker (a cron job, a CI step) waits for its broker unless told: it is
# expected to end, so it gives up and says so; a daemon waits as long as it takes.
BURST_CONNECT_TIMEOUT_S = 30.0


def connect_budget(connect_timeout_s: float | None, burst: bool) -> float:
    """Seconds to wait for the broker: the worker's ``connect_timeout_s``, or by default
    forever, and BURST_CONNECT_TIMEOUT_S in burst mode."""
    if connect_timeout_s is not None:
        return connect_timeout_s
    return BURST_CONNECT_TIMEOUT_S if burst else math.inf


async def connect(app: Offload, stopping: asyncio.Event, limit_s: float) -> Backends | None:
    """Open the app's broker and store, trying again for up to ``limit_s`` (0: once); then
    raise `BrokerUnavailable`. None when ``stopping`` was set first (the caller closes whatever
    was opened with the app)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    pauses = CONNECT_BACKOFF.pauses()
    attempt = 0
    while True:
        attempt += 1
        connecting = asyncio.ensure_future(app._backends())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((connecting, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # run() itself cancelled: the attempt must not live on
            connecting.cancel()
            raise
        finally:
            stop.cancel()
        if not connecting.done():
            # Cut short: each attempt may take the backend's own connect timeout, seconds.
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            return None
        try:
            backends = connecting.result()
        except BrokerUnavailable as e:
            waited = loop.time() - began
            if waited >= limit_s:
                if attempt == 1:
                    raise
                raise BrokerUnavailable(
                    e.url, f"{e.reason}; gave up after waiting {waited:.1f} s for it (connect timeout {limit_s:g} s)"
                ) from e
            pause = min(next(pauses), limit_s - waited)
            log.warning("broker %s unavailable (%s); retrying in %.1f s", e.url, e.reason, pause)
            if await pause_unless_stopped(pause, stopping):
                return None
            continue
        if stopping.is_set():
            return None
        if attempt > 1:
            log.info("reached the broker after %.1f s (attempt %d)", loop.time() - began, attempt)
        return backends


async def pause_unless_stopped(seconds: float, stopping: asyncio.Event) -> bool:
    """Sleep ``seconds``, cut short when ``stopping`` is set. True when it was."""
    await _first_of(asyncio.sleep(seconds), stopping.wait())
    return stopping.is_set()


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()

