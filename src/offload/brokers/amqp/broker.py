"""`AmqpBroker`: the `Broker` protocol on RabbitMQ, composed of the package's parts (its
docstring lists them); each method here says which part does the work."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Collection, Sequence
from typing import Any

from offload.brokers.amqp.acks import Acker
from offload.brokers.amqp.admin import Admin
from offload.brokers.amqp.connection import Connections, Settings, discard
from offload.brokers.amqp.consumer import Background, Consumer
from offload.brokers.amqp.deliveries import Deliveries
from offload.brokers.amqp.messages import is_stale, still_open
from offload.brokers.amqp.publisher import Publisher
from offload.brokers.amqp.records import Records
from offload.brokers.amqp.topology import Names, Topology
from offload.brokers.base import Broker, DeadLetter, Delivery, OutgoingMessage, QueueStats, Store
from offload.brokers.states import StateRow
from offload.config import BrokerURL

_instances = itertools.count(1)


class AmqpBroker(Broker):
    """RabbitMQ broker; see the package docstring for the topology and the guarantees."""

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self.settings = Settings.from_url(url)
        #: names this broker's connections in RabbitMQ ("{client_name} producer" and
        #: "{client_name} consumer"), to find them with rabbitmqctl list_connections
        self.client_name = f"offload {namespace} {os.getpid()}.{next(_instances)}"
        self.names = Names(namespace)
        self.records = Records(url)
        self.connections = Connections(url, self.settings, self.client_name)
        self.topology = Topology(self.names, self.connections, self.records)
        self.publisher = Publisher(self.connections, self.topology, self.records)
        self._background = Background()
        self._acks = Acker()  # every ack and nack of the consumer channel's deliveries
        self.consumer = Consumer(self.connections, self.topology, self.publisher, self._acks, self._background)
        self.deliveries = Deliveries(
            self.connections, self.records, self.publisher, self.consumer.buffer, self._acks, self._background
        )
        self.admin = Admin(self.connections, self.topology, self.records, self.consumer, self.deliveries, self._acks)

    def bind_store(self, store: Store) -> None:
        """Give the broker the key-value space it keeps dedup keys, claims and its queue
        registry in (`records`). Call it before `connect`."""
        self.records.store = store

    async def connect(self) -> None:
        if self.connections.conn is not None:
            return
        self.connections.heartbeat_s = self.lease_s
        try:
            await self.connections.connect()
            await self.topology.ensure()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._background.close()
        conns = [self.consumer.detach(), self.connections.detach()]
        self.consumer.forget_hops()
        self.deliveries.leased.clear()
        self.topology.reset()
        for conn in conns:
            if conn is not None:
                await discard(conn)

    # -- producing (`publisher`) ----------------------------------------------------------------
    async def enqueue(self, message: OutgoingMessage) -> str:
        return await self.publisher.enqueue(message)

    # -- consuming (`consumer`, `deliveries`) ---------------------------------------------------
    def refills_with(self, store: Store) -> bool:
        return store is self.records.store  # the claims live there

    def local_ready(self, queues: Sequence[str]) -> int:
        return self.consumer.buffer.count(set(queues))

    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        self.connections.require()
        deadline = time.monotonic() + timeout_s
        async with self.consumer.fetching(queues, limit):
            order = {q: i for i, q in enumerate(queues)}
            while True:
                taken = self.consumer.buffer.take(order, limit)
                if taken:
                    handed = await self.deliveries.admit(taken, early=self.hands_out_early)
                    if handed:
                        return handed
                    continue
                if not await self.consumer.buffer.wait(deadline):
                    return []

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.deliveries.settle(deliveries, release_key=True)

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None = None,
    ) -> list[Delivery]:
        """Store the outcomes, then ack. A refill hands out buffered messages of its queues
        (RabbitMQ pushed them while the tasks ran, see `consumer.window`), their claims written
        in the same round trip as the outcomes: a busy worker claims nothing on its own."""
        return await self.deliveries.store_and_ack(store, states, ttl_s, final, deliveries, refill)

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        await self.deliveries.requeue(delivery, body, delay_s)

    async def _extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Nothing to renew: RabbitMQ holds a delivery until its ack or until its channel closes
        (mind ``consumer_timeout``, see `deliveries`). The deliveries whose channel has closed
        are lost: RabbitMQ gives them to another consumer. Each channel still open here is
        asked one round trip, since a worker that was frozen learns only by using its
        connection that RabbitMQ closed it meanwhile (for missed AMQP heartbeats)."""
        by_channel: dict[int, tuple[Any, list[Delivery]]] = {}
        lost = []
        for d in deliveries:
            if d.receipt is None:
                continue
            if is_stale(d.receipt):
                lost.append(d)
            else:
                channel = d.receipt.channel
                by_channel.setdefault(id(channel), (channel, []))[1].append(d)
        for channel, held in by_channel.values():
            if not await still_open(channel):
                lost += held
        return lost
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.deliveries.dead_letter(delivery, reason)

    # -- administration (`admin`, `records`) ----------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self.connections.require()
        return await self.admin.dead_letters(limit)

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        self.connections.require()
        return await self.admin.replay(ids)

    async def cancel(self, message_id: str) -> bool:
        self.connections.require()
        return await self.records.cancel(message_id)

    async def purge(self, queue: str) -> int:
        """Removes the queue's ready messages, its scheduled ones in the delay levels and the
        ones this process buffered, one by one so that their dedup keys are released."""
        self.connections.require()
        return await self.admin.purge(queue)

    async def stats(self) -> QueueStats:
        self.connections.require()
        return await self.admin.stats()

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        """An estimate from the depths of the delay levels. A message enters the longest level
        not longer than its delay, so one in the level of L ms is due within 2L: the levels up
        to ``within_s`` count, whatever queue their messages go back to (a level does not say),
        and a message of a longer level counts once it has hopped down to one of them. Also
        counted: a message between two levels in this process, and ready messages of
        ``queues`` not yet pushed to a consumer."""
        self.connections.require()
        return await self.admin.due_within(queues, within_s)

    async def flush_namespace(self) -> None:
        """Delete the namespace's queues (those this process declared and those in the
        registry) and exchanges. Other processes' consumers should be stopped first: aio-pika
        declares the queue of a consumer again when its queue is deleted under it."""
        self.connections.require()
        await self.admin.flush_namespace()
