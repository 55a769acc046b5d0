"""The sync face's portal: a coroutine run on offload's own loop from a blocking caller gives
back its value or its error, starts in the caller's context, and is cancelled when the caller
stops waiting."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator

import pytest

from offload.portal import Portal

who = contextvars.ContextVar("who", default="nobody")


@pytest.fixture
def portal() -> Iterator[Portal]:
    made = Portal()
    yield made
    made.stop()


def test_values_errors_and_the_callers_context(portal: Portal) -> None:
    async def answer() -> tuple[str, bool]:
        return who.get(), threading.current_thread().name == "offload-portal"

    async def fail() -> None:
        raise KeyError("missing")

    who.set("caller")
    assert portal.run(answer()) == ("caller", True)
    with pytest.raises(KeyError, match="missing"):
        portal.run(fail())
    # Callers in several threads at once each get their own answer.
    results: dict[int, int] = {}

    async def double(i: int) -> int:
        await asyncio.sleep(0.001)
        return 2 * i

    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, portal.run(double(i)))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: 2 * i for i in range(20)}


def test_a_caller_that_stops_waiting_cancels_the_work(portal: Portal) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        portal.run(forever(), timeout=0.05)
    assert cancelled.wait(5)


def test_a_blocking_call_from_the_portals_own_loop_is_refused(portal: Portal) -> None:
    async def nested() -> None:
        async def inner() -> None:
            return None

        portal.run(inner())

    with pytest.raises(RuntimeError, match="use the async form"):
        portal.run(nested())
