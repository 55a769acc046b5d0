"""The worker's places, and the refill that fills them in the writer's round trips.

A worker leases at most ``capacity`` messages (its concurrency plus its prefetch). The fetch
loop alone takes places, and starts a task for each message. Where the broker can lease with
the store's write (`Broker.refills_with`), a batch of acks asks for the next messages in the
same round trip: `Refill` reserves the free places when the batch goes out, and keeps what it
brought for the fetch loop to `take`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sized
from typing import Any

from offload.brokers.base import Broker, Delivery

log = logging.getLogger("offload.worker")


class Places:
    """How many more messages the worker may lease: ``capacity``, less those ``held`` and
    those ``reserved`` for a claim in flight (a fetch, or a refill riding with acks).
    ``changed`` is set whenever the fetch loop should look again: a place freed, a refill
    back, a stop."""

    def __init__(self, capacity: int, held: Sized) -> None:
        self.capacity = capacity
        self._held = held
        self.reserved = 0
        #: The last claim filled every place it asked for: the queues likely have more.
        self.backlog = False
        self.changed = asyncio.Event()

    def free(self) -> int:
        return self.capacity - len(self._held) - self.reserved


class Refill:
    """The claims that ride along with the writer's batches of acks (the writer's `Refill`
    protocol; see `StateWriter`). It reserves places and keeps what comes back; starting the
    tasks is the fetch loop's. A claim back after the worker began stopping goes back to the
    queue at once."""

    def __init__(self, places: Places, queues: list[str], broker: Broker, stopping: asyncio.Event) -> None:
        self._places, self._queues, self._broker, self._stopping = places, queues, broker, stopping
        # Each refill back: the places it reserved, and the messages it leased.
        self._claimed: collections.deque[tuple[int, list[Delivery]]] = collections.deque()
        self._giving_back: set[asyncio.Future[Any]] = set()

    def more_ready(self) -> bool:
        """The queues have more: the last claim filled every place, or the broker holds some."""
        return self._places.backlog or self._broker.local_ready(self._queues) > 0

    def ask(self) -> tuple[list[str], int] | None:
        """A batch of acks goes out: reserve the free places for its refill, if worth it."""
        free = self._places.free()
        if free <= 0 or self._stopping.is_set() or not self.more_ready():
            return None
        self._places.reserved += free
        return self._queues, free

    def got(self, asked: tuple[list[str], int] | None, deliveries: list[Delivery]) -> None:
        """The batch is written, and brought ``deliveries`` if ``asked``."""
        if asked is not None:
            if self._stopping.is_set():
                self._places.reserved -= asked[1]
                self._give_back(deliveries)  # too late to start
            else:
                self._places.backlog = len(deliveries) == asked[1]
                self._claimed.append((asked[1], deliveries))
        # Either way the fetch loop looks again: it takes these, or takes over the claiming
        # if the batches stopped or the queues ran dry.
        self._places.changed.set()

    def take(self) -> list[Delivery]:
        """For the fetch loop: what the refills brought since it last looked. Their reserved
        places are the caller's to hold now."""
        taken: list[Delivery] = []
        while self._claimed:
            asked, deliveries = self._claimed.popleft()
            self._places.reserved -= asked
            taken += deliveries
        return taken

    @property
    def pending(self) -> bool:
        """Refills are back that the fetch loop has not taken yet."""
        return bool(self._claimed)

    def put_back_untaken(self) -> None:
        """The fetch loop is done: what it did not take goes back to the queue."""
        self._give_back(self.take())

    def _give_back(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            task = asyncio.ensure_future(self._requeue(d))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

    async def _requeue(self, delivery: Delivery) -> None:
        try:
            await self._broker.requeue(delivery)
        except Exception as e:  # its lease runs out and it comes back anyway
            log.warning("could not put back %s (%s); it returns when its lease runs out", delivery.id, e)

    async def close(self) -> None:
        """Once the writer is flushed: put back what was never taken, and wait for that."""
        self.put_back_untaken()
        await asyncio.gather(*self._giving_back, return_exceptions=True)
