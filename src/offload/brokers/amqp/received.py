"""A consumer's delivery as the amqp broker reads it: aiormq's message, with the few properties
offload uses read when asked.

Consumers are registered with aiormq directly. Through aio-pika, every delivery became an
`IncomingMessage`, which decodes and copies each property up front (about 30 us a delivery on
the machine in docs/performance.md), and ran its callback in one more task. Settling keeps
aio-pika's rules, so the `Acker` treats both kinds alike (basic.get still returns aio-pika's).
"""

from __future__ import annotations

from typing import Any

import aiormq
from aio_pika.exceptions import MessageProcessError
from aiormq.abc import AbstractChannel, DeliveredMessage


class Received:
    __slots__ = ("_delivered", "_settled")

    def __init__(self, delivered: DeliveredMessage) -> None:
        self._delivered = delivered
        self._settled = False

    @property
    def headers(self) -> dict[str, Any]:
        return self._delivered.header.properties.headers or {}

    @property
    def body(self) -> bytes:
        return self._delivered.body

    @property
    def priority(self) -> int | None:
        return self._delivered.header.properties.priority

    @property
    def message_id(self) -> str | None:
        return self._delivered.header.properties.message_id

    @property
    def redelivered(self) -> bool:
        return bool(getattr(self._delivered.delivery, "redelivered", False))

    @property
    def delivery_tag(self) -> int | None:
        return getattr(self._delivered.delivery, "delivery_tag", None)

    @property
    def routing_key(self) -> str | None:
        return self._delivered.routing_key

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; raises once that channel has closed (its tag is void)."""
        channel = self._delivered.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        return channel

    def _settle(self) -> AbstractChannel:
        if self._settled:
            raise MessageProcessError("Message already processed", self)
        channel = self.channel
        self._settled = True
        return channel

    async def ack(self, multiple: bool = False) -> None:
        await self._settle().basic_ack(self.delivery_tag or 0, multiple=multiple)

    async def nack(self, requeue: bool = True) -> None:
        await self._settle().basic_nack(self.delivery_tag or 0, multiple=False, requeue=requeue)
