"""Retrying an operation with backoff within a time budget: the one loop behind every broker's
connect, reconnect and "wait through a lost connection".

Hand-written rather than tenacity: on the path where the first attempt succeeds (nearly every
publish) an `AsyncRetrying` costs about 50 µs against 0.2 µs for this loop (docs/performance.md),
and that path is the one every message takes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Names the reason to try again after an error, or None when trying again cannot help
#: (the server answered and refused): the error then propagates at once.
Transient = Callable[[BaseException], "str | None"]
#: Builds what is raised once the budget is spent, from the last reason and error.
GiveUp = Callable[[str, BaseException], BaseException]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses that double from ``first_s`` up to ``cap_s``; with ``jitter``, each is drawn from
    ``spread`` of that ([50 %, 100 %] unless told) so that many clients that failed together do
    not retry together."""

    first_s: float = 0.1
    cap_s: float = 1.0
    jitter: bool = False
    spread: tuple[float, float] = (0.5, 1.0)

    def pauses(self) -> Iterator[float]:
        pause = self.first_s
        low, high = self.spread
        while True:
            yield pause * random.uniform(low, high) if self.jitter else pause
            pause = min(pause * 2, self.cap_s)


async def retry_within(
    budget_s: float,
    attempt: Callable[[float], Awaitable[T]],
    transient: Transient,
    give_up: GiveUp,
    backoff: Backoff = Backoff(),
    on_retry: Callable[[str, float], None] | None = None,
) -> T:
    """Await ``attempt(seconds_left)`` until it succeeds. A transient error is tried again after
    the next pause, as long as that pause ends inside the budget; then ``give_up`` is raised.
    Only the budget bounds the wait: an attempt is given the time left, to bound itself by."""
    deadline = time.monotonic() + budget_s
    for pause in backoff.pauses():
        try:
            return await attempt(max(deadline - time.monotonic(), 0.05))
        except BaseException as e:
            reason = transient(e)
            if reason is None:
                raise
            error = e
        if time.monotonic() + pause >= deadline:
            raise give_up(reason, error)  # outside the except: no chained context unless give_up sets one
        if on_retry is not None:
            on_retry(reason, pause)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable: pauses() never ends")


def retry_within_sync(
    budget_s: float, attempt: Callable[[], T], transient: Transient, give_up: GiveUp, backoff: Backoff = Backoff()
) -> T:
    """`retry_within` for a blocking ``attempt`` run in a thread of its own."""
    deadline = time.monotonic() + budget_s
    for pause in backoff.pauses():
        try:
            return attempt()
        except Exception as e:
            reason = transient(e)
            if reason is None:
                raise
            error = e
        if time.monotonic() + pause >= deadline:
            raise give_up(reason, error)  # outside the except: no chained context unless give_up sets one
        time.sleep(pause)
    raise AssertionError("unreachable: pauses() never ends")
