"""Handing out buffered deliveries and settling them.

A fetch turns buffered messages into `Delivery` objects once their claims are written (see
`records`): a revoked one is acked unrun, a copy whose ack was lost is acked on arrival. A busy
worker's batches of outcomes take its next messages from the buffer (the refill of
`store_and_ack`), their claims written in the same round trip as the outcomes, so it seldom
claims on its own. An ack of several deliveries sends one basic.ack with ``multiple`` for the
run of delivery tags that no delivery still held interrupts (see `acks`), and one frame each
for the others.

Leases: RabbitMQ keeps a delivery unacknowledged until the consumer acks it or its channel
closes, then delivers it again (with the redelivered flag, counted in ``deliveries``). So there
is no lease to renew: `extend` does nothing and ``lease_s`` is unused. But RabbitMQ's
``consumer_timeout`` (30 minutes by default) closes the channel of a consumer that holds a
delivery longer, and the message runs again elsewhere: raise it in rabbitmq.conf (or with the
``x-consumer-timeout`` queue argument on RabbitMQ 3.12+) for tasks that run longer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence

from offload.brokers.amqp.acks import Acker, Settled
from offload.brokers.amqp.buffer import Buffer, Buffered
from offload.brokers.amqp.connection import Connections
from offload.brokers.amqp.consumer import Background
from offload.brokers.amqp.messages import (
    H_COPY,
    H_DELIVERIES,
    H_EXPIRES,
    H_ID,
    Incoming,
    copy_of,
    is_stale,
    key_of,
    number,
    text,
)
from offload.brokers.amqp.publisher import Publisher
from offload.brokers.amqp.records import CLAIM_TTL_S, REVOKED, Records
from offload.brokers.base import Delivery, Store, Verdict
from offload.brokers.states import StateRow
from offload.errors import BrokerError

log = logging.getLogger("offload.brokers.amqp")

RECLAIM_PAUSE_S = 1.0  # after a claim failed, before the messages are claimed again
LOST_ACKS_KEPT = 10_000

#: Writes the claims of messages (by id); True for each one a cancel got to first.
Claim = Callable[[list[str]], Awaitable[list[bool]]]


class Deliveries:
    """The deliveries handed out and still running here, and what settles them."""

    def __init__(
        self,
        connections: Connections,
        records: Records,
        publisher: Publisher,
        buffer: Buffer,
        acks: Acker,
        background: Background,
    ) -> None:
        self._connections = connections
        self._records = records
        self._publisher = publisher
        self._buffer = buffer
        self._acks = acks
        self._background = background
        self.leased: dict[str, Delivery] = {}  # by copy token
        # Copies whose ack was lost with their channel: when RabbitMQ hands them back to this
        # process, they are acked instead of run a second time.
        self.lost_acks: OrderedDict[str, None] = OrderedDict()

    # -- handing out ----------------------------------------------------------------------------
    async def admit(self, taken: list[Buffered], claim: Claim | None = None, *, early: bool = False) -> list[Delivery]:
        """Turn buffered messages into deliveries, dropping revoked and already-acked copies.
        ``claim`` (default `Records.claim`) is called once, with the ids that need a claim.
        ``early`` (a caller that `hands_out_early`, without its own ``claim``): the claim is
        sent and the deliveries are handed out at once, each with its verdict to come
        (`Delivery.admitted`): the round trip overlaps with the worker starting the tasks, and
        the fetch loop is free sooner."""
        settled: set[int] = set()  # id() of the buffered items acked or merged here
        handed: list[Delivery] = []
        try:
            candidates: list[tuple[Buffered, str, str]] = []
            for item in taken:
                headers = item.message.headers or {}
                copy = text(headers.get(H_COPY)) or f"?{id(item.message)}"
                message_id = text(headers.get(H_ID)) or item.message.message_id or copy
                running = self.leased.get(copy)
                if running is not None and is_stale(running.receipt):
                    # Redelivered after this process's channel closed, while its task still
                    # runs here: the running delivery's ack now settles this delivery.
                    running.receipt = item.message
                    settled.add(id(item))
                elif copy in self.lost_acks:
                    del self.lost_acks[copy]
                    await self._acks.ack([item.message])
                    settled.add(id(item))
                    await self._records.release_key(key_of(item.message), message_id)
                else:
                    candidates.append((item, copy, message_id))
            if claim is None and early:
                return self._admit_later(candidates)
            verdicts = await (claim or self._records.claim)([message_id for _, _, message_id in candidates])
            for (item, copy, message_id), revoked in zip(candidates, verdicts, strict=True):
                if revoked:
                    log.info("dropping cancelled message %s", message_id)
                    await self._acks.ack([item.message])
                    settled.add(id(item))
                    await self._records.release_key(key_of(item.message), message_id)
                    continue
                handed.append(self._hand_out(item, copy, message_id))
        except BaseException:
            # Nothing is handed out: keep every message not settled here in the buffer,
            # still unacknowledged, for the next fetch.
            for delivery in handed:
                self.forget(delivery)
            self._buffer.put_back([item for item in taken if id(item) not in settled])
            raise
        return handed

    def _admit_later(self, candidates: list[tuple[Buffered, str, str]]) -> list[Delivery]:
        if not candidates:
            return []
        loop = asyncio.get_running_loop()
        claim = self._background.spawn(self._records.claim([message_id for _, _, message_id in candidates]))
        handed: list[Delivery] = []
        verdicts: list[asyncio.Future[Verdict]] = []
        for item, copy, message_id in candidates:
            delivery = self._hand_out(item, copy, message_id)
            delivery.admitted = verdict = loop.create_future()
            verdicts.append(verdict)
            handed.append(delivery)

        def spread(done: asyncio.Task[list[bool]]) -> None:
            if done.cancelled():  # closing: the channel goes, RabbitMQ keeps the messages
                for verdict in verdicts:
                    verdict.cancel()
                return
            error = done.exception()
            if error is not None:
                # As when a fetch's own claim fails: the messages wait here, unacknowledged,
                # and are claimed again a moment later.
                log.warning(
                    "claiming %d message(s) failed (%s); trying again in %.1f s",
                    len(handed), self._connections.reason(error), RECLAIM_PAUSE_S,
                )
                for delivery in handed:
                    self.forget(delivery)
                loop.call_later(RECLAIM_PAUSE_S, self._buffer.buffer_again, [item for item, _, _ in candidates])
            for i, verdict in enumerate(verdicts):
                if verdict.done():  # its worker stopped waiting (shutdown cancelled the wait)
                    continue
                if error is not None:
                    verdict.set_result(Verdict.TAKEN_BACK)
                else:
                    verdict.set_result(Verdict.REVOKED if done.result()[i] else Verdict.RUN)

        claim.add_done_callback(spread)
        return handed

    def _hand_out(self, item: Buffered, copy: str, message_id: str) -> Delivery:
        headers = item.message.headers or {}
        deliveries = int(number(headers.get(H_DELIVERIES)) or 0) + 1 + int(bool(item.message.redelivered))
        delivery = Delivery(message_id, item.queue, item.message.body, deliveries, receipt=item.message)
        self.leased[copy] = delivery
        return delivery

    # -- settling -------------------------------------------------------------------------------
    def forget(self, delivery: Delivery) -> None:
        if delivery.receipt is None:
            return
        copy = copy_of(delivery.receipt)
        if copy is not None and self.leased.get(copy) is delivery:
            del self.leased[copy]

    def _receipt(self, delivery: Delivery) -> Incoming:
        if delivery.receipt is None:
            raise BrokerError(f"delivery {delivery.id} did not come from this amqp broker")
        receipt: Incoming = delivery.receipt
        return receipt

    async def settle(self, deliveries: Sequence[Delivery], *, release_key: bool) -> None:
        messages = [self._receipt(delivery) for delivery in deliveries]
        for delivery in deliveries:
            self.forget(delivery)
        # One batch: the acks of a run of delivery tags go out as one frame.
        outcomes = await self._acks.ack(messages)
        for delivery, message, outcome in zip(deliveries, messages, outcomes, strict=True):
            if outcome is Settled.LOST:
                copy = copy_of(message)
                if copy is not None:
                    self.lost_acks[copy] = None
                    while len(self.lost_acks) > LOST_ACKS_KEPT:
                        self.lost_acks.popitem(last=False)
                log.warning(
                    "ack of %s lost with its channel: RabbitMQ will deliver it again (a copy coming back "
                    "to this process is acked on arrival)",
                    delivery.id,
                )
            elif outcome is Settled.ACKED and release_key:
                await self._records.release_key(key_of(message), delivery.id)

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None,
    ) -> list[Delivery]:
        """`AmqpBroker.store_and_ack`: store the outcomes, then ack; a refill hands out
        buffered messages of its queues, their claims written beside the outcomes."""
        taken: list[Buffered] = []
        if refill is not None and states and store is self._records.store:
            queues, limit = refill
            taken = self._buffer.take({q: i for i, q in enumerate(queues)}, limit)
        if taken:

            async def claim_with_states(message_ids: list[str]) -> list[bool]:
                held = await store.put_states_and_set_many_if_absent(
                    states, ttl_s, final, self._records.claims(message_ids), CLAIM_TTL_S
                )
                return [value == REVOKED for value in held]

            handed = await self.admit(taken, claim_with_states)
        else:
            handed = []
            if states:
                await store.put_states(states, ttl_s, final)
        if deliveries:
            try:
                await self.settle(deliveries, release_key=True)
            except BaseException:
                # The refill is not handed out after all: back to the buffer, for a fetch (a
                # claim that is already ours does not stop it).
                receipts = {id(d.receipt) for d in handed}
                for delivery in handed:
                    self.forget(delivery)
                self._buffer.put_back([item for item in taken if id(item.message) in receipts])
                raise
        return handed

    async def requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        message = self._receipt(delivery)
        headers = message.headers or {}
        # Waiting for its next attempt, the message may be cancelled again.
        await self._records.unclaim(delivery.id)
        # The new copy is confirmed before the old one is acked: a crash in between runs the
        # task twice rather than never.
        await self._publisher.send(
            message_id=delivery.id,
            queue=delivery.queue,
            body=delivery.body if body is None else body,
            priority=message.priority or 0,
            eta=time.time() + delay_s if delay_s > 0 else None,
            expires=number(headers.get(H_EXPIRES)),
            key=key_of(message),
            deliveries=delivery.deliveries,
        )
        await self.settle([delivery], release_key=False)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        message = self._receipt(delivery)
        await self._publisher.send_dead(delivery, reason, key_of(message))
        await self.settle([delivery], release_key=True)
