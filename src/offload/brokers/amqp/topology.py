"""The namespace's exchanges and queues on RabbitMQ: their names, arguments and declaration.

Everything is durable and named after the namespace (``P`` is ``offload.{namespace}``)::

    P.{queue}                 one classic queue per offload queue: x-max-priority=10, expired
                              messages dead-lettered to P:dead
    P:delay (headers)   --->  P:delay:{ms}  one queue per delay level, 64 ms to ~4.7 h in powers
                              of two: x-message-ttl=ms, then dead-lettered to the default
                              exchange, which routes the message back to P.{queue} by the
                              routing key it was published with
    P:dead (fanout)     --->  P:dead  dead letters, with their reason in a header

Delays need no plugin: a message due in ``d`` seconds enters the largest level not longer than
``d``; when it comes back to its queue and its eta (a header) is still ahead, the consumer sends
it through the next level, so a long delay hops down the levels and arrives at most 64 ms late.
Hops happen while a consumer is running; until then a message whose level ran out waits in its
queue, and `stats` counts it as queued. A delayed message carries a per-message ``expiration``
when it has ``expires``: expiring in a delay level sends it to its queue at once. In its queue
it has none, because RabbitMQ would then dead-letter it unseen and its task state would stay
"queued"; workers check ``expires`` on receipt and record it as expired.
"""

from __future__ import annotations

from typing import Any

import aiormq

from offload.brokers.amqp.connection import Connections
from offload.brokers.amqp.messages import H_DELAY, MAX_PRIORITY
from offload.brokers.amqp.records import Records
from offload.errors import BrokerError

# Delay levels in milliseconds. Powers of two keep a delay's hop count at the number of 1 bits
# in it; the smallest level bounds how late a delayed message may arrive.
DELAY_LEVELS_MS: tuple[int, ...] = tuple(2**k for k in range(6, 25))


def level_ms(remaining_s: float) -> int:
    """The longest delay level that does not overshoot, or the shortest one."""
    remaining_ms = remaining_s * 1000.0
    fitting = [ms for ms in DELAY_LEVELS_MS if ms <= remaining_ms]
    return fitting[-1] if fitting else DELAY_LEVELS_MS[0]


class Names:
    """The RabbitMQ names of a namespace's queues and exchanges."""

    def __init__(self, namespace: str) -> None:
        self.prefix = f"offload.{namespace}"
        self.dead = f"{self.prefix}:dead"  # the dead-letter exchange and its queue
        self.delay_exchange = f"{self.prefix}:delay"
        #: the arguments of every offload queue (not of the delay levels)
        self.queue_args: dict[str, Any] = {
            "x-max-priority": MAX_PRIORITY,
            "x-dead-letter-exchange": self.dead,
            "x-queue-type": "classic",
        }

    def queue(self, queue: str) -> str:
        return f"{self.prefix}.{queue}"

    def level(self, ms: int) -> str:
        return f"{self.prefix}:delay:{ms}"

    def levels(self) -> list[str]:
        return [self.level(ms) for ms in DELAY_LEVELS_MS]


class Topology:
    """Declares the namespace's exchanges and delay levels once, and each queue before its
    first use; `forget` and `reset` make the next use declare again (after a deletion)."""

    def __init__(self, names: Names, connections: Connections, records: Records) -> None:
        self.names = names
        self._connections = connections
        self._records = records
        self._ready = False
        self.declared: set[str] = set()

    async def ensure(self) -> None:
        """Declare the dead-letter exchange and queue, the delay exchange and its levels."""
        if self._ready:
            return
        names = self.names

        async def declare(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.exchange_declare(names.dead, exchange_type="fanout", durable=True)
            await ch.queue_declare(names.dead, durable=True, arguments={"x-queue-type": "classic"})
            await ch.queue_bind(names.dead, names.dead, routing_key="")
            await ch.exchange_declare(names.delay_exchange, exchange_type="headers", durable=True)
            for ms in DELAY_LEVELS_MS:
                # No priority here: with equal TTLs, a priority would let later messages
                # overtake earlier ones and hold them past their due time.
                name = names.level(ms)
                args: dict[str, Any] = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-queue-type": "classic"}
                await ch.queue_declare(name, durable=True, arguments=args)
                await ch.queue_bind(name, names.delay_exchange, arguments={"x-match": "all", H_DELAY: str(ms)})

        try:
            await self._connections.admin_call("declare the namespace's exchanges", declare)
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"RabbitMQ at {self._connections.url.masked} holds {names.prefix}:* exchanges or queues declared "
                f"otherwise than offload declares them ({self._connections.scrub(str(e))}); delete them or use another namespace"
            ) from None
        self._ready = True

    async def declare(self, queue: str) -> None:
        """Declare an offload queue (once) and add it to the namespace's registry."""
        if queue in self.declared:
            return
        name = self.names.queue(queue)
        connections = self._connections
        try:
            await connections.admin_call(
                f"declare queue {name}",
                lambda ch: ch.queue_declare(name, durable=True, arguments=self.names.queue_args),
            )
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"queue {name!r} on {connections.url.masked} already exists, declared otherwise than offload "
                f"needs (x-max-priority={MAX_PRIORITY}, x-dead-letter-exchange={self.names.dead}, classic); "
                f"RabbitMQ says: {connections.scrub(str(e))}. Priorities would be ignored on it: delete it "
                f"(rabbitmqctl delete_queue {name}) or use another queue name"
            ) from None
        self.declared.add(queue)
        await self._records.register(queue)

    def forget(self, queue: str) -> None:
        """The queue may have been deleted: declare it again on its next use."""
        self.declared.discard(queue)

    def reset(self) -> None:
        """The exchanges may have been deleted: declare them again on their next use."""
        self._ready = False

    def clear(self) -> None:
        self.declared.clear()
        self._ready = False
