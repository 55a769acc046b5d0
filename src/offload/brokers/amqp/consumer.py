"""Consuming: a consumer per fetched queue, on a connection of its own (so that RabbitMQ's flow
control on publishers never holds back acks), pushes deliveries into a local buffer, from which
fetches take them by priority, then queue order, then arrival.

The prefetch bounds how many deliveries per queue this process holds unacknowledged, handed out
or not; RabbitMQ orders by priority only what it has not pushed yet. A fetch for other queues
than the last one cancels the consumers it no longer needs and puts back what they had
buffered. A delivery back from a delay level before its eta is sent down the next level at once
(a hop), whether or not a fetch is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from functools import partial
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from offload.brokers.amqp.acks import TRANSIENT, Acker
from offload.brokers.amqp.buffer import Buffer
from offload.brokers.amqp.connection import Connections
from offload.brokers.amqp.messages import (
    DUE_SLACK_S,
    H_DELIVERIES,
    H_ETA,
    H_EXPIRES,
    H_ID,
    H_KEY,
    Incoming,
    number,
    text,
)
from offload.brokers.amqp.publisher import Publisher
from offload.brokers.amqp.received import Received
from offload.brokers.amqp.topology import Topology
from offload.retrying import Backoff

log = logging.getLogger("offload.brokers.amqp")

T = TypeVar("T")

# Starting a consumer again after its channel came back: pauses of 0.1 s doubling up to 5 s,
# for as long as the consumer is wanted.
CONSUME_AGAIN_BACKOFF = Backoff(first_s=0.1, cap_s=5.0)


def window(places: int) -> int:
    """RabbitMQ's prefetch for a worker with ``places`` (its first fetch's limit: running plus
    held). RabbitMQ sends a message only after the ack of another, so with exactly ``places``
    the next messages are still on their way when places free up, and each fetch claims one or
    two on its own. As many again wait in the buffer, where the acks' refill hands them out with
    their claims written beside the outcomes (`AmqpBroker.store_and_ack`). Half as many again
    was too few once a worker's threads took their next task without the loop: the buffer ran
    dry between batches and most claims went out on their own again."""
    places = max(places, 1)
    return places * 2


class Background:
    """Tasks the broker runs on its own (hops, give-backs, early claims); `close` cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Consumer:
    """The consumer connection, its consumers and the buffer of what they delivered."""

    def __init__(
        self, connections: Connections, topology: Topology, publisher: Publisher, acks: Acker, background: Background
    ) -> None:
        self._connections = connections
        self._topology = topology
        self._publisher = publisher
        self._acks = acks
        self._background = background
        self._conn: AbstractRobustConnection | None = None  # fetch, ack
        self.channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        self._consumers: dict[str, str] = {}  # queue -> consumer tag
        # Queues whose deliveries are wanted; set before basic.consume, whose first deliveries
        # may run before the consumer tag is known.
        self._active: set[str] = set()
        self.buffer = Buffer(self._active)
        self._fetching = 0
        self._hopping: dict[str, int] = {}  # queue -> messages on their way to the next delay level

    @property
    def queues(self) -> list[str]:
        """The queues consumed now."""
        return list(self._consumers)

    # -- starting and stopping consumers --------------------------------------------------------
    @contextlib.asynccontextmanager
    async def fetching(self, queues: tuple[str, ...], limit: int) -> AsyncIterator[None]:
        """Around a fetch: consume ``queues``; the first of concurrent fetches also stops
        consuming the queues it does not name."""
        self._fetching += 1
        try:
            if self._fetching == 1 and set(self._consumers) - set(queues):
                await self.stop(keep=queues)
            await self._start(queues, limit)
            yield
        finally:
            self._fetching -= 1

    async def _start(self, queues: Sequence[str], limit: int) -> None:
        if self._conn is not None and all(q in self._consumers for q in queues):
            return  # the usual case, on every fetch of a running worker: nothing to take a lock for
        async with self._lock:
            if self._conn is None:
                self._connections.require()
                self._conn = await self._connections.open_connection("consumer")
                channel = await self._conn.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self._connections.settings.prefetch or window(limit))
                channel.reopen_callbacks.add(self._on_channel_reopened)
                self.channel = channel
            consumer_channel = self.channel
            assert consumer_channel is not None
            names = self._topology.names
            for queue in queues:
                if queue in self._consumers:
                    continue
                await self._topology.declare(queue)
                # Declared again on the robust channel so that, after a reconnection, aio-pika
                # declares it before the consumers start again (`_on_channel_reopened`).
                await consumer_channel.declare_queue(names.queue(queue), durable=True, arguments=names.queue_args)
                self._active.add(queue)
                try:
                    self._consumers[queue] = await self._consume(queue)
                except BaseException:
                    self._active.discard(queue)
                    raise

    async def _consume(self, queue: str) -> str:
        """basic.consume on the consumer channel as it is now; the consumer tag."""
        assert self.channel is not None
        channel = await self.channel.get_underlay_channel()
        if self._on_consumer_cancelled not in channel.on_consumer_cancel_callbacks:
            channel.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
        ok = await channel.basic_consume(self._topology.names.queue(queue), partial(self.on_delivered, queue))
        return str(ok.consumer_tag)

    def _on_channel_reopened(self, *_: Any) -> None:
        # After a reconnection (or a channel error) the robust channel has declared the queues
        # again and set the prefetch; the consumers are offload's own to start again.
        self._background.spawn(self._consume_again(list(self._consumers)))

    async def _on_consumer_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # RabbitMQ cancelled a consumer: its queue was deleted behind this process's back. It is
        # declared again and consumed anew. Called from the channel's reader, so it must not wait
        # for the channel itself.
        queue = next((q for q, tag in self._consumers.items() if tag == frame.consumer_tag), None)
        if queue is not None:
            self._topology.forget(queue)
            self._background.spawn(self._consume_again([queue], cancelled=frame.consumer_tag))

    async def _consume_again(self, queues: list[str], cancelled: str | None = None) -> None:
        for pause in CONSUME_AGAIN_BACKOFF.pauses():
            if not queues:
                return
            async with self._lock:
                wanted = [q for q in queues if q in self._consumers and (cancelled is None or self._consumers[q] == cancelled)]
                if self.channel is None or not wanted:
                    return
                try:
                    for queue in wanted:
                        if cancelled is not None:
                            await self._topology.declare(queue)
                        self._consumers[queue] = await self._consume(queue)
                        queues.remove(queue)
                    return
                except (*TRANSIENT, aiormq.exceptions.AMQPError) as e:
                    log.warning(
                        "could not consume %s again (%s); retrying in %.1f s", wanted, self._connections.reason(e), pause
                    )
            await asyncio.sleep(pause)

    async def stop(self, keep: Sequence[str] = ()) -> None:
        """Cancel the consumers of queues not in ``keep`` and give back what they buffered."""
        async with self._lock:
            for queue in [q for q in self._consumers if q not in keep]:
                tag = self._consumers.pop(queue)
                self._active.discard(queue)
                with contextlib.suppress(*TRANSIENT, aiormq.exceptions.AMQPError):
                    if self.channel is not None:
                        await (await self.channel.get_underlay_channel()).basic_cancel(tag)
            returned = self.buffer.keep_only(keep)
        for item in returned:
            await self.give_back(item.message)

    def detach(self) -> AbstractRobustConnection | None:
        """Forget the consumer connection and all it held; the connection, for `discard`."""
        conn, self._conn, self.channel = self._conn, None, None
        self._consumers.clear()
        self._active.clear()
        self.buffer.clear()
        self._acks.clear()
        return conn

    def forget_hops(self) -> None:
        # Hops cancelled (by `Background.close`) before they began never count themselves out.
        self._hopping.clear()

    async def detach_locked(self) -> AbstractRobustConnection | None:
        """`detach`, once no consumer is being started or cancelled."""
        async with self._lock:
            return self.detach()

    # -- deliveries -----------------------------------------------------------------------------
    async def give_back(self, message: Incoming) -> None:
        # Nothing to do when its channel closed: RabbitMQ has put it back already.
        await self._acks.give_back(message)

    async def on_delivered(self, queue: str, delivered: aiormq.abc.DeliveredMessage) -> None:
        self.on_message(queue, Received(delivered))

    def on_message(self, queue: str, message: Incoming) -> None:
        # Never waits: what must wait (giving back, hopping) runs in a task of its own.
        self._acks.track(message)
        if queue not in self._active:
            self._background.spawn(self.give_back(message))  # raced with the consumer's cancellation
            return
        headers = message.headers or {}
        eta = number(headers.get(H_ETA))
        expires = number(headers.get(H_EXPIRES))
        now = time.time()
        expired = expires is not None and expires <= now
        if eta is not None and eta > now + DUE_SLACK_S and not expired:
            # Back from a delay level too early: send it down the next one right away, so the
            # hops go on whether or not a fetch is waiting.
            self._hopping[queue] = self._hopping.get(queue, 0) + 1
            self._background.spawn(self._hop(queue, message))
            return
        # An expired message goes to a worker at once, whatever its eta: the worker records it
        # as expired.
        self._buffer_when_due(queue, message, None if expired else eta)

    def _buffer_when_due(self, queue: str, message: Incoming, eta: float | None) -> None:
        """Buffer the message, or, when it is due within the slack (too soon for another hop),
        once its eta has passed: it is never handed out before its eta."""
        left = 0.0 if eta is None else eta - time.time()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._buffer_when_due, queue, message, eta)
            return
        if queue not in self._active:  # its consumer was cancelled while it waited
            self._background.spawn(self.give_back(message))
            return
        self.buffer.add(queue, message)

    async def _hop(self, queue: str, message: Incoming) -> None:
        headers = message.headers or {}
        try:
            await self._publisher.send(
                message_id=text(headers.get(H_ID)) or message.message_id or "",
                queue=queue,
                body=message.body,
                priority=message.priority or 0,
                eta=number(headers.get(H_ETA)),
                expires=number(headers.get(H_EXPIRES)),
                key=text(headers.get(H_KEY)),
                deliveries=int(number(headers.get(H_DELIVERIES)) or 0),
            )
            # Lost with its channel, the old copy comes back and hops again: a duplicate
            # delivery, never a lost one.
            await self._acks.ack([message])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Sending failed after its own retries: back to the queue, to hop on its next delivery.
            log.warning("could not delay message %s further: %s", message.message_id, self._connections.reason(e))
            await self.give_back(message)
        finally:
            left = self._hopping.get(queue, 0) - 1  # close() may have cleared the count
            if left > 0:
                self._hopping[queue] = left
            else:
                self._hopping.pop(queue, None)

    def hopping(self, queues: Sequence[str]) -> bool:
        """Is a message of these queues between two delay levels in this process?"""
        return any(self._hopping.get(q) for q in queues)
