"""Reading and clearing the namespace's queues: dead letters and their replay, purge, stats,
`due_within`, and deleting everything (`flush_namespace`).

Queues are read with basic.get on the producer's admin channel. `stats().running` counts the
deliveries this broker object holds: AMQP itself does not report unacknowledged counts (the
management API does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial

import aio_pika
import aiormq

from offload.brokers.amqp.acks import Acker
from offload.brokers.amqp.connection import Connections, discard
from offload.brokers.amqp.consumer import Consumer
from offload.brokers.amqp.deliveries import Deliveries
from offload.brokers.amqp.messages import H_DIED_AT, H_ID, H_QUEUE, H_REASON, Incoming, key_of, number, text
from offload.brokers.amqp.records import Records
from offload.brokers.amqp.topology import DELAY_LEVELS_MS, Topology
from offload.brokers.base import DeadLetter, QueueStats


async def _delete_queue(name: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.queue_delete(name)


async def _delete_exchange(name: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.exchange_delete(name)


class Admin:
    """The broker's operations on whole queues."""

    def __init__(
        self,
        connections: Connections,
        topology: Topology,
        records: Records,
        consumer: Consumer,
        deliveries: Deliveries,
        acks: Acker,
    ) -> None:
        self._connections = connections
        self._topology = topology
        self._names = topology.names
        self._records = records
        self._consumer = consumer
        self._deliveries = deliveries
        self._acks = acks
        self._lock = asyncio.Lock()  # basic.get browsing and acking on the admin channel

    # -- reading queues with basic.get ----------------------------------------------------------
    async def _get(self, queue_name: str, *, no_ack: bool) -> Incoming | None:
        """One message from a queue, None when empty (or when the queue does not exist)."""

        async def call(ch: aiormq.abc.AbstractChannel) -> Incoming | None:
            got = await ch.basic_get(queue_name, no_ack=no_ack)
            if isinstance(got.delivery, aiormq.spec.Basic.GetEmpty):
                return None
            return aio_pika.IncomingMessage(got, no_ack=no_ack)

        try:
            # Not retried: a browse cannot resume on a new channel, where what it held
            # unacknowledged has gone back to the queue.
            deadline = time.monotonic() + self._connections.settings.publish_timeout_s
            return await call(await self._connections.admin_channel(deadline))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None

    async def _browse(self, queue_name: str, take: Callable[[Incoming], bool]) -> list[Incoming]:
        """Read a whole queue; remove and return the messages ``take`` accepts, put the others
        back in their places (RabbitMQ requeues to the original position)."""
        taken: list[Incoming] = []
        kept: list[Incoming] = []
        try:
            while (message := await self._get(queue_name, no_ack=False)) is not None:
                (taken if take(message) else kept).append(message)
        finally:
            for message in kept:
                await self._consumer.give_back(message)
        for message in taken:
            await message.ack()
        return taken

    async def _depth(self, queue_name: str) -> int:
        async def call(ch: aiormq.abc.AbstractChannel) -> int:
            ok = await ch.queue_declare(queue_name, passive=True)
            return int(ok.message_count or 0)

        try:
            return await self._connections.admin_call(f"read the depth of {queue_name}", call)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0

    async def known_queues(self) -> list[str]:
        """The queues declared here, consumed here, or in the namespace's registry."""
        declared = sorted(self._topology.declared)
        return list(dict.fromkeys([*declared, *self._consumer.queues, *await self._records.registered()]))

    # -- dead letters ---------------------------------------------------------------------------
    def _as_dead_letter(self, message: Incoming) -> DeadLetter:
        headers = message.headers or {}
        reason = text(headers.get(H_REASON))
        died_at = number(headers.get(H_DIED_AT))
        deaths = headers.get("x-death")
        if reason is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            # Dead-lettered by RabbitMQ itself (an expired message).
            cause = text(deaths[0].get("reason")) or "dead-lettered"
            reason = "expired before it started" if cause == "expired" else f"dead-lettered by RabbitMQ: {cause}"
            when = deaths[0].get("time")
            died_at = when.timestamp() if isinstance(when, datetime) else died_at
        queue = text(headers.get(H_QUEUE))
        if queue is None:
            routing_key = message.routing_key or ""
            queue = routing_key.removeprefix(f"{self._names.prefix}.")
        return DeadLetter(
            id=text(headers.get(H_ID)) or message.message_id or "",
            queue=queue,
            body=message.body,
            reason=reason or "unknown",
            died_at=died_at if died_at is not None else 0.0,
        )

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        async with self._lock:
            browsed: list[DeadLetter] = []

            def look(message: Incoming) -> bool:
                browsed.append(self._as_dead_letter(message))
                return False

            await self._browse(self._names.dead, look)
        return sorted(browsed, key=lambda d: d.died_at, reverse=True)[:limit]

    async def replay(self, ids: Sequence[str] | None) -> list[DeadLetter]:
        wanted = None if ids is None else set(ids)
        async with self._lock:
            taken = await self._browse(
                self._names.dead, lambda m: wanted is None or self._as_dead_letter(m).id in wanted
            )
        letters = [self._as_dead_letter(m) for m in taken]
        for message, letter in zip(taken, letters, strict=True):
            # A message RabbitMQ expired still holds its dedup key.
            await self._records.release_key(key_of(message), letter.id)
        return letters

    # -- purge, stats, due_within, flush --------------------------------------------------------
    async def purge(self, queue: str) -> int:
        """Removes the queue's ready messages, its scheduled ones in the delay levels and the
        ones this process buffered, one by one so that their dedup keys are released."""
        name = self._names.queue(queue)
        removed: list[Incoming] = []
        async with self._lock:
            while (message := await self._get(name, no_ack=True)) is not None:
                removed.append(message)
            for level in self._names.levels():
                removed += await self._browse(level, lambda m: m.routing_key == name)
        buffered = self._consumer.buffer.take_queue(queue)
        await self._acks.ack(buffered)
        removed += buffered
        for message in removed:
            await self._records.release_key(key_of(message), text((message.headers or {}).get(H_ID)) or "")
        return len(removed)

    async def stats(self) -> QueueStats:
        """Depths from passive declares. ``oldest_age_s`` stays empty: RabbitMQ tells a queue's
        message count over AMQP, but not when its head arrived (only its management API does)."""
        out = QueueStats()
        for queue in await self.known_queues():
            depth = await self._depth(self._names.queue(queue))
            depth += self._consumer.buffer.count({queue})
            if depth:
                out.queued[queue] = depth
        for level in self._names.levels():
            out.scheduled += await self._depth(level)
        out.running = len(self._deliveries.leased)
        out.dead = await self._depth(self._names.dead)
        return out

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        """See `AmqpBroker.due_within`."""
        if self._consumer.hopping(queues):
            return True
        for ms in DELAY_LEVELS_MS:
            if ms > within_s * 1000:
                break
            if await self._depth(self._names.level(ms)):
                return True
        for queue in dict.fromkeys(queues):
            if await self._depth(self._names.queue(queue)):
                return True
        return False

    async def flush_namespace(self) -> None:
        """See `AmqpBroker.flush_namespace`."""
        queues = await self.known_queues()
        # The consumer connection goes first, so that no reconnection declares its queues again.
        consumer_conn = await self._consumer.detach_locked()
        if consumer_conn is not None:
            await discard(consumer_conn)
        names = [*(self._names.queue(q) for q in queues), *self._names.levels(), self._names.dead]
        for name in names:
            await self._connections.admin_call(f"delete queue {name}", partial(_delete_queue, name))
        for exchange in (self._names.delay_exchange, self._names.dead):
            await self._connections.admin_call(f"delete exchange {exchange}", partial(_delete_exchange, exchange))
        await self._records.clear_registry()
        self._topology.clear()
        self._deliveries.leased.clear()
        self._deliveries.lost_acks.clear()
