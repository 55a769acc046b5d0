"""The deliveries RabbitMQ pushed to this process that no fetch has handed out yet.

A fetch takes them by priority, then by the order of the queues it names, then by arrival
(RabbitMQ orders by priority only what it has not pushed yet). A delivery whose channel closed
is dropped on the way: RabbitMQ delivers it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from offload.brokers.amqp.messages import Incoming, is_stale


@dataclass(slots=True)
class Buffered:
    """A delivery pushed by RabbitMQ that no fetch has handed out yet."""

    queue: str
    seq: int
    message: Incoming

    @property
    def priority(self) -> int:
        return int(self.message.priority or 0)


class Buffer:
    """The buffered deliveries, and the event a waiting fetch is woken by."""

    def __init__(self, active: Collection[str]) -> None:
        #: the queues whose deliveries are wanted (the consumer's, kept up to date by it)
        self._active = active
        self.items: list[Buffered] = []
        self._arrived = asyncio.Event()
        self._seq = itertools.count()

    def add(self, queue: str, message: Incoming) -> None:
        self.items.append(Buffered(queue, next(self._seq), message))
        self._arrived.set()

    def count(self, queues: Collection[str]) -> int:
        return sum(1 for b in self.items if b.queue in queues)

    def take(self, order: dict[str, int], limit: int) -> list[Buffered]:
        """Up to ``limit`` buffered deliveries of the queues in ``order`` (queue -> rank),
        highest priority first, then by rank, then by arrival; stale ones are dropped."""
        live = [b for b in self.items if not is_stale(b.message)]
        mine = sorted((b for b in live if b.queue in order), key=lambda b: (-b.priority, order[b.queue], b.seq))
        taken = mine[:limit]
        chosen = {id(b) for b in taken}
        self.items = [b for b in live if id(b) not in chosen]
        return taken

    def take_queue(self, queue: str) -> list[Incoming]:
        """Remove and return the live buffered deliveries of ``queue`` (a purge)."""
        taken = [b.message for b in self.items if b.queue == queue and not is_stale(b.message)]
        self.items = [b for b in self.items if b.queue != queue]
        return taken

    def keep_only(self, queues: Collection[str]) -> list[Buffered]:
        """Remove and return the buffered deliveries of queues not in ``queues``."""
        returned = [b for b in self.items if b.queue not in queues]
        self.items = [b for b in self.items if b.queue in queues]
        return returned

    def put_back(self, items: Sequence[Buffered]) -> None:
        """Return taken deliveries that were not handed out after all, for the next fetch."""
        self.items.extend(items)

    def buffer_again(self, items: Sequence[Buffered]) -> None:
        """As `put_back`, later: only those whose consumer and channel are still there."""
        for item in items:
            if item.queue in self._active and not is_stale(item.message):
                self.items.append(item)
            # Otherwise its consumer or channel is gone, and RabbitMQ delivers it again.
        self._arrived.set()

    def clear(self) -> None:
        self.items.clear()

    async def wait(self, deadline: float) -> bool:
        """Wait until something is buffered or ``deadline`` (monotonic); False once it passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._arrived.clear()
        # asyncio.timeout rather than wait_for: no task per wait, and an idle worker
        # waits here once per delivery.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await self._arrived.wait()
        return True
