"""Publishing to RabbitMQ with confirms: a message to its queue or, not yet due, to a delay
level (see `topology`), and a dead letter to the dead-letter exchange.

Enqueue speed: an enqueue returns once RabbitMQ confirms the message, and it confirms a
persistent message once it has written it. Version 2 of the classic queue storage (RabbitMQ
3.10+) confirms sooner (about 0.5 ms instead of 0.8 ms on a local server), but on RabbitMQ 3.10
it hands a message to a waiting consumer later (1.45 ms after the publish instead of 0.7 ms), so
offload's queues keep version 1: a task's round trip matters more than the enqueue rate. For
enqueue-heavy loads, choose version 2 with a policy, e.g. ``rabbitmqctl set_policy offload-cqv2
'^offload' '{"queue-version":2}' --apply-to queues``, not with the ``x-queue-version`` argument:
RabbitMQ refuses to declare an existing queue again with another argument than it was created
with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiormq

from offload.brokers.amqp.connection import Connections
from offload.brokers.amqp.messages import (
    H_COPY,
    H_DELAY,
    H_DELIVERIES,
    H_DIED_AT,
    H_ID,
    H_KEY,
    H_QUEUE,
    H_REASON,
    PERSISTENT,
    Outgoing,
    clamp_priority,
    expiration,
    is_due,
    message_headers,
    timestamp,
)
from offload.brokers.amqp.records import Records
from offload.brokers.amqp.topology import Topology, level_ms
from offload.brokers.base import Delivery, OutgoingMessage
from offload.errors import BrokerError


class Publisher:
    """Sends copies of messages on the producer's confirming channel."""

    def __init__(self, connections: Connections, topology: Topology, records: Records) -> None:
        self._connections = connections
        self._topology = topology
        self._records = records

    async def enqueue(self, message: OutgoingMessage) -> str:
        """`Broker.enqueue`: the message's id, or that of the message holding its key."""
        self._connections.require()
        if message.key is not None:
            holder = await self._records.hold_key(message)
            if holder is not None:
                return holder
        try:
            await self.send(
                message_id=message.id,
                queue=message.queue,
                body=message.body,
                priority=message.priority,
                eta=message.eta,
                expires=message.expires,
                key=message.key,
                deliveries=0,
            )
        except BaseException:
            if message.key is not None:
                with contextlib.suppress(Exception):
                    await self._records.release_key(message.key, message.id)
            raise
        return message.id

    async def send(
        self,
        *,
        message_id: str,
        queue: str,
        body: bytes,
        priority: int,
        eta: float | None,
        expires: float | None,
        key: str | None,
        deliveries: int,
    ) -> None:
        """Publish one copy of a message, to its queue or, when it is not due, to a delay level."""
        topology = self._topology
        await topology.declare(queue)
        now = time.time()
        headers = message_headers(message_id, queue, deliveries, key=key, expires=expires, eta=eta, now=now)
        exchange = ""
        expires_in: str | None = None
        if eta is not None and not is_due(eta, now):
            await topology.ensure()
            headers[H_DELAY] = str(level_ms(eta - now))
            exchange = topology.names.delay_exchange
            # Expiring in a delay level sends the message on to its queue early, where a worker
            # records it as expired. Not in the queue itself: RabbitMQ would dead-letter it
            # without any worker recording its state.
            expires_in = expiration(expires - now) if expires is not None else None

        def build() -> Outgoing:
            return body, aiormq.spec.Basic.Properties(
                headers={**headers, H_COPY: uuid.uuid4().hex},
                priority=clamp_priority(priority),
                delivery_mode=PERSISTENT,
                message_id=message_id,
                expiration=expires_in,
            )

        async def redeclare() -> None:
            topology.forget(queue)
            topology.reset()
            await topology.ensure()
            await topology.declare(queue)

        await self._publish(exchange, topology.names.queue(queue), build, redeclare)

    async def send_dead(self, delivery: Delivery, reason: str, key: str | None) -> None:
        """Publish a dead letter of ``delivery``, with its reason, to the dead-letter exchange."""
        topology = self._topology
        await topology.ensure()
        dead_headers: dict[str, Any] = {
            H_ID: delivery.id,
            H_QUEUE: delivery.queue,
            H_REASON: reason,
            H_DIED_AT: timestamp(time.time()),
            H_DELIVERIES: delivery.deliveries,
        }
        if key is not None:
            dead_headers[H_KEY] = key

        def build() -> Outgoing:
            return delivery.body, aiormq.spec.Basic.Properties(
                headers={**dead_headers, H_COPY: uuid.uuid4().hex},
                delivery_mode=PERSISTENT,
                message_id=delivery.id,
            )

        async def redeclare() -> None:
            topology.reset()
            await topology.ensure()

        await self._publish(topology.names.dead, topology.names.queue(delivery.queue), build, redeclare)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        build: Callable[[], Outgoing],
        redeclare: Callable[[], Awaitable[None]],
    ) -> None:
        """Publish with a broker confirm; wait through reconnections. A message RabbitMQ
        cannot route (its queue or exchange was deleted elsewhere) is declared again, once."""
        masked = self._connections.url.masked
        redeclared = False
        while True:
            try:
                await self._connections.retrying(
                    f"publish to {routing_key}", partial(self._publish_once, exchange, routing_key, build)
                )
                return
            except (aiormq.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity) as e:
                if redeclared:
                    raise BrokerError(
                        f"RabbitMQ at {masked} cannot route to {routing_key!r}: {self._connections.reason(e)}"
                    ) from None
                redeclared = True
                await redeclare()
            except aiormq.exceptions.DeliveryError as e:
                raise BrokerError(
                    f"RabbitMQ at {masked} refused a message for {routing_key!r}: {self._connections.reason(e)}"
                ) from None

    async def _publish_once(self, exchange: str, routing_key: str, build: Callable[[], Outgoing]) -> None:
        connections = self._connections
        connections.require()
        channel = connections.publisher
        if channel is None:
            raise aiormq.exceptions.ChannelInvalidStateError("no publisher channel")
        timeout_s = connections.settings.publish_timeout_s
        if channel.is_closed:  # reopening after a lost connection or a channel error
            await asyncio.wait_for(channel.ready(), timeout_s)
        # Straight to aiormq with the properties built here: aio-pika's Message and Exchange
        # would only check and copy them (about 25 us per message). A missing exchange fails
        # like a missing queue and is declared again by `_publish`; a return (mandatory) or a
        # nack raises as it does through aio-pika, since the channel is the same.
        body, properties = build()
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties,
            mandatory=True, timeout=timeout_s,
        )
