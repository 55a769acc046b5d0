"""Settling RabbitMQ deliveries, several acks in one frame where AMQP allows it.

An ack with ``multiple=True`` settles every unacknowledged delivery of its channel up to and
including its delivery tag. That is right only when each lower tag of the channel is either
being acked in the same batch or settled already: a lower tag still held (buffered, running,
hopping through the delay levels) would be acked behind its task's back and lost if the worker
died. A `Ledger` per channel knows which tags this process has settled, so the batch gets one
frame for its run of tags that no held tag interrupts, and one frame each for the others.

Tags are counted, not registered: a tag RabbitMQ delivered that this process has not seen yet
(its callback has not run) is neither settled nor in the batch, and stops the run.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from typing import Any, Protocol

import aio_pika
import aiormq

# Errors after which the same call can succeed once the connection is back.
TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class Delivered(Protocol):
    """A delivery to settle: a consumer's (`Received`) or basic.get's (aio-pika's message)."""

    @property
    def channel(self) -> Any: ...  # raises ChannelInvalidStateError once closed
    @property
    def delivery_tag(self) -> int | None: ...
    async def ack(self, multiple: bool = False) -> Any: ...
    async def nack(self, *, requeue: bool = True) -> Any: ...  # aio-pika's takes ``multiple`` first


class Settled(enum.Enum):
    ACKED = "acked"
    BEFORE = "settled before"  # acked or put back earlier: nothing was sent
    LOST = "lost"  # its channel closed (or closed while sending): RabbitMQ delivers it again


class Ledger:
    """The delivery tags of one channel that this process has acked or nacked.

    Kept as runs of consecutive tags above a floor: a delivery held for an hour while thousands
    after it are acked stops the floor, and the tags settled meanwhile make one run, not a set
    that grows by one entry per ack. There are about as many runs as deliveries still held.
    """

    __slots__ = ("floor", "runs")

    def __init__(self) -> None:
        self.floor = 0  # every tag up to here is settled (tags start at 1)
        # Settled tags above the floor: [first, last] runs, sorted, neither touching nor
        # overlapping, all above floor + 1 (which is unsettled, or it would be the floor).
        self.runs: list[list[int]] = []

    def _run_of(self, tag: int) -> list[int] | None:
        i = bisect.bisect_right(self.runs, tag, key=lambda run: run[0])
        return self.runs[i - 1] if i and self.runs[i - 1][1] >= tag else None

    def is_settled(self, tag: int) -> bool:
        return tag <= self.floor or self._run_of(tag) is not None

    def settle(self, tag: int) -> None:
        if self.is_settled(tag):
            return
        runs = self.runs
        i = bisect.bisect_right(runs, tag, key=lambda run: run[0])
        joins_left = i > 0 and runs[i - 1][1] == tag - 1
        joins_right = i < len(runs) and runs[i][0] == tag + 1
        if joins_left and joins_right:
            runs[i - 1][1] = runs[i][1]
            del runs[i]
        elif joins_left:
            runs[i - 1][1] = tag
        elif joins_right:
            runs[i][0] = tag
        else:
            runs.insert(i, [tag, tag])
        if tag == self.floor + 1:
            self.floor = runs[0][1]
            del runs[0]

    def multiple_upto(self, batch: set[int]) -> int:
        """The highest tag of ``batch`` that an ack with multiple=True may name (0: none): every
        tag below it is settled or in ``batch``."""
        best, tag = 0, self.floor + 1
        while True:
            if tag in batch:
                best = tag
                tag += 1
            elif (run := self._run_of(tag)) is not None:
                tag = run[1] + 1
            else:
                return best


class Acker:
    """Acks and nacks for the messages of consumer channels (see the module docstring). Every
    settlement of a tracked channel's messages must go through it; messages of other channels
    (basic.get on the admin channel) are settled one by one, as they come."""

    def __init__(self) -> None:
        self._ledgers: dict[Any, Ledger] = {}

    def track(self, message: Delivered) -> None:
        """Called on each delivery of a consumer, before anything can settle it."""
        try:
            channel = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return
        if channel not in self._ledgers:
            # A new channel (a reconnection): the closed ones' tags are void.
            for old in [c for c in self._ledgers if c.is_closed]:
                del self._ledgers[old]
            self._ledgers[channel] = Ledger()

    def clear(self) -> None:
        self._ledgers.clear()

    async def ack(self, messages: Sequence[Delivered]) -> list[Settled]:
        """Ack the messages; per message, what became of it. A `TRANSIENT` or AMQP error means
        the ack was lost with its channel."""
        out = [Settled.ACKED] * len(messages)
        runs: dict[Any, dict[int, int]] = {}  # channel -> tag -> index in messages
        for i, message in enumerate(messages):
            try:
                channel = message.channel
            except aiormq.exceptions.ChannelInvalidStateError:
                out[i] = Settled.LOST
                continue
            ledger = self._ledgers.get(channel)
            tag = message.delivery_tag
            if ledger is None or tag is None:
                out[i] = await self._ack_one(message)
            elif ledger.is_settled(tag) or tag in runs.get(channel, {}):
                out[i] = Settled.BEFORE
            else:
                runs.setdefault(channel, {})[tag] = i
        for channel, by_tag in runs.items():
            ledger = self._ledgers[channel]
            top = ledger.multiple_upto(set(by_tag))
            # Settled in the ledger before the frames go out, so that no other settlement
            # sends one of these tags again meanwhile.
            for tag in by_tag:
                ledger.settle(tag)
            try:
                if top:
                    await messages[by_tag[top]].ack(multiple=True)
                for tag in sorted(t for t in by_tag if t > top):
                    await messages[by_tag[tag]].ack()
            except (*TRANSIENT, aiormq.exceptions.AMQPError):
                # Whether some frames went out is unknown: RabbitMQ redelivers what it missed.
                for i in by_tag.values():
                    out[i] = Settled.LOST
        return out

    @staticmethod
    async def _ack_one(message: Delivered) -> Settled:
        try:
            await message.ack()
        except aio_pika.exceptions.MessageProcessError:
            return Settled.BEFORE
        except (*TRANSIENT, aiormq.exceptions.AMQPError):
            return Settled.LOST
        return Settled.ACKED

    async def give_back(self, message: Delivered) -> None:
        """Nack with requeue, unless settled already or its channel closed (RabbitMQ has put
        it back then)."""
        try:
            channel = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return
        ledger = self._ledgers.get(channel)
        tag = message.delivery_tag
        if ledger is not None and tag is not None:
            if ledger.is_settled(tag):
                return
            ledger.settle(tag)
        try:
            await message.nack(requeue=True)
        except (*TRANSIENT, aio_pika.exceptions.MessageProcessError):
            pass
