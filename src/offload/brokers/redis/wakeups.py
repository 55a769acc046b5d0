"""The broker's side of waiting fetches: how a fetch blocked on empty queues learns that it
should claim again, or is handed a message without claiming.

A fetch that finds nothing registers itself in ``waiters:<queue>`` within the same script
(see lib_claim.lua), and sleeps until a message is handed to it, a message on
``wake:<queue>``, the time the next scheduled message or lease is due, or its timeout. An
enqueue that finds a fetch waiting on its queue leases the message to it at once and
publishes it on that fetch's ``hand:`` channel (see hand() in lib_common.lua), so an idle
worker starts the task without a claim of its own; a handed message that its fetch no longer
waits for is served by the next fetch of the same broker object, or put back at close.
Producers publish only while someone waits, so a busy system carries no pub/sub traffic per
task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from offload.brokers.base import Delivery
from offload.brokers.redis.pubsub import Flag

__all__ = ["Claiming", "Handed", "Registration", "Wakeups"]

log = logging.getLogger("offload.brokers.redis")


class Wakeups:
    """The broker's sink on its queues' wake channels: wakes the fetches waiting on a queue."""

    def __init__(self) -> None:
        self._by_channel: dict[bytes, set[Flag]] = {}
        #: wake-ups seen (and reconnections, which may have lost some), fetches waiting or not
        self.count = 0

    def listen(self, channels: Sequence[bytes]) -> Flag:
        flag = Flag()
        for c in channels:
            self._by_channel.setdefault(c, set()).add(flag)
        return flag

    def forget(self, channels: Sequence[bytes], flag: Flag) -> None:
        for c in channels:
            group = self._by_channel.get(c)
            if group is not None:
                group.discard(flag)
                if not group:
                    del self._by_channel[c]

    def deliver(self, channel: bytes, data: bytes) -> None:
        self.count += 1
        for flag in self._by_channel.get(channel, ()):
            flag.set()

    def reset(self) -> None:
        self.count += 1
        self.wake_all()

    def wake_all(self) -> None:
        for group in self._by_channel.values():
            for flag in group:
                flag.set()


@dataclass(slots=True)
class Registration:
    """This broker object standing registered as a waiter on some queues, after a claim that
    found them empty. While it holds, a fetch on the same queues needs no claim of its own: an
    enqueue hands it the message, and anything else that makes a message ready (a requeue, a
    due scheduled message or lease) publishes a wake-up, which ends it."""

    waiter: str
    queues: tuple[str, ...]
    until: float  # loop time, a margin before the server forgets the registration
    left: int  # hand-offs it may still receive
    wakes: int  # the broker's wake-up count when it was made
    due: float | None  # loop time when a scheduled message or a lease comes due, if any

    def holds(self, queues: tuple[str, ...], now: float, wakes: int) -> bool:
        return (
            queues == self.queues and self.left > 0 and now < self.until and wakes == self.wakes
            and (self.due is None or now < self.due)
        )  # fmt: skip


@dataclass(slots=True)
class Claiming:
    """A claim on its way that may register ``waiter``: hand-offs to it seen before its reply."""

    waiter: str
    handed: int = 0


class Handed:
    """Messages an enqueue handed to this broker's blocked fetches (see ``hand()`` in the Lua):
    already leased to this process, kept until a fetch for their queue takes them."""

    def __init__(self, channel: bytes, wakeups: Wakeups, on_handed: Callable[[str], None]) -> None:
        self._channel = channel
        self._wakeups = wakeups
        self._on_handed = on_handed
        self._items: list[Delivery] = []

    def deliver(self, channel: bytes, data: bytes) -> None:
        head, _, rest = data.partition(b"\n")
        try:
            n_waiter, n_id, n_queue, deliveries = (int(x) for x in head.split())
        except ValueError:
            log.warning("ignored a malformed hand-off on %s", channel.decode(errors="replace"))
            return
        at = n_waiter
        message_id, queue = rest[at : at + n_id].decode(), rest[at + n_id : at + n_id + n_queue].decode()
        body = rest[at + n_id + n_queue :]
        self._items.append(Delivery(message_id, queue, body, deliveries, receipt=str(deliveries)))
        self._on_handed(rest[:at].decode())
        self._wakeups.wake_all()  # whichever fetch listens on the queue takes it

    def reset(self) -> None:
        """Pub/sub was rebuilt: a hand-off lost meanwhile comes back when its lease runs out."""

    def take(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        if not self._items:
            return []
        mine = [d for d in self._items if d.queue in queues][:limit]
        if mine:
            taken = {id(d) for d in mine}
            self._items = [d for d in self._items if id(d) not in taken]
        return mine

    def take_all(self) -> list[Delivery]:
        items, self._items = self._items, []
        return items

