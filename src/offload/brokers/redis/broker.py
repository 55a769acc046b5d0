"""`RedisBroker`: the queues of a namespace, claimed and leased by Lua scripts.

A message is in exactly one of ``q:<queue>``, ``sched`` and ``lease`` at a time (see `keys`),
and every move between them happens inside one script, so claiming and leasing are one atomic
step and a delayed message never sits inside a lease. A lease's receipt is the message's
delivery count, which every new lease raises: an ack, a requeue or an extend with the receipt
of a lease that ran out, the message since claimed again, does nothing. Every operation is one round trip, and every
script is safe to run twice: a fetch retried after its reply was lost hands out the same
leases again. How a fetch waits without polling is told in `wakeups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Collection, Sequence

from offload.brokers.base import Broker, DeadLetter, Delivery, OutgoingMessage, QueueStats, Store
from offload.brokers.redis.admin import QueueAdmin
from offload.brokers.redis.argv import ack_args, claimed, enqueue_args, receipt, settle_args, text
from offload.brokers.redis.connection import Commands, connect_bounded, pubsub_client
from offload.brokers.redis.keys import Keys
from offload.brokers.redis.pubsub import Hub
from offload.brokers.redis.scripts import Arg, Script, load
from offload.brokers.redis.store import RedisStore
from offload.brokers.redis.wakeups import Claiming, Handed, Registration, Wakeups
from offload.brokers.states import StateRow
from offload.config import BrokerURL
from offload.errors import BrokerError

__all__ = ["RedisBroker"]

# A fetch relies on its standing registration only until this long before the server forgets it.
_REGISTRATION_MARGIN_S = 0.25


class RedisBroker(Broker):
    writes_initial_state = True

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._keys = Keys.of(namespace)
        self._cmds = Commands(url, namespace)
        self._ps_client = pubsub_client(url, namespace)
        self._hub = Hub(self._ps_client, url.masked)
        self._wakeups = Wakeups()
        self._wake_subscribed: set[bytes] = set()
        self._hand_channel = self._keys.new_hand_channel()
        self._handed = Handed(self._hand_channel, self._wakeups, self._on_handed)
        self._registration: Registration | None = None
        self._claiming: Claiming | None = None
        self._admin = QueueAdmin(self._cmds, self._keys)
        on = [self._keys.prefix]
        self._enqueue = Script(self._cmds, "enqueue", on)
        self._claim = Script(self._cmds, "claim", on)
        self._script_ack = Script(self._cmds, "ack", on)
        self._settle = Script(self._cmds, "settle", on)
        self._script_extend = Script(self._cmds, "extend", on)
        self._script_requeue = Script(self._cmds, "requeue", on)
        self._scripts = [
            self._enqueue, self._claim, self._script_ack, self._settle, self._script_extend, self._script_requeue,
            *self._admin.scripts,
        ]  # fmt: skip

    async def connect(self) -> None:
        # Probe with the non-retrying client so the budget holds; the pub/sub connection opens
        # on the first waiting fetch, so a process that only enqueues never holds one.
        async def probe() -> None:
            await self._ps_client.ping()

        await connect_bounded(self.url, probe)
        await load(self._cmds, self._scripts)

    async def close(self) -> None:
        await self._hub.close()
        # Handed to a fetch that is no longer waiting: back to the queue rather than waiting
        # for the lease to run out.
        for delivery in self._handed.take_all():
            with contextlib.suppress(BrokerError):
                await self.requeue(delivery)
        await self._ps_client.aclose()
        await self._cmds.close()

    async def enqueue(self, message: OutgoingMessage) -> str:
        return text(await self._enqueue(enqueue_args(message)))

    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        names = queues
        channels = [self._keys.wake_channel(q) for q in names]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        # Listen, and be subscribed, before the first claim registers us as waiting: an enqueue
        # landing right after that claim publishes, and the message must reach us.
        flag = self._wakeups.listen(channels)
        try:
            if timeout_s > 0:
                await self._subscribe_wakeups([*channels, self._hand_channel])
            while True:
                handed = self._handed.take(names, limit)
                if handed:
                    return handed
                now = loop.time()
                reg = self._registration
                if reg is None or not reg.holds(names, now, self._wakeups.count):
                    # Claim; finding nothing registers us, and the registration serves the next
                    # fetches too while it lasts: an idle worker is handed messages without a
                    # claim per message (see Registration).
                    reg = self._registration = None
                    waiter = uuid.uuid4().hex
                    left = max(deadline - now, 0.0)
                    # Counted from before the claim: a wake-up or a hand-off that reaches the
                    # pub/sub connection ahead of the claim's reply must count against the
                    # registration, or it would stand for messages the server no longer sends.
                    wakes = self._wakeups.count
                    self._claiming = Claiming(waiter)
                    try:
                        got, next_in = await self._claim_once(list(names), limit, uuid.uuid4().hex, waiter, left)
                    finally:
                        claiming, self._claiming = self._claiming, None
                    if got:
                        return got
                    now = loop.time()
                    due = None if next_in is None else now + next_in
                    if left > 0:
                        reg = Registration(waiter, names, now + left + 1 - _REGISTRATION_MARGIN_S,
                                           limit - claiming.handed, wakes, due)  # fmt: skip
                        if self._hub.started and reg.left > 0:
                            self._registration = reg
                    if due is not None and due <= now:
                        continue
                left = deadline - now
                if left <= 0:
                    return []
                if reg is not None:
                    left = min(left, max(reg.until - now, 0.001))
                    if reg.due is not None:
                        left = min(left, max(reg.due - now, 0.001))
                await flag.wait(left)
        finally:
            self._wakeups.forget(channels, flag)

    def _on_handed(self, waiter: str) -> None:
        reg = self._registration
        if reg is not None and reg.waiter == waiter:
            reg.left -= 1
        elif self._claiming is not None and self._claiming.waiter == waiter:
            self._claiming.handed += 1

    async def _subscribe_wakeups(self, channels: list[bytes]) -> None:
        missing = [c for c in channels if c not in self._wake_subscribed]
        if not missing:
            return
        if not self._hub.started:
            await connect_bounded(self.url, self._hub.start)
        hand = [c for c in missing if c == self._hand_channel]
        if hand:
            await self._hub.add(hand, self._handed)
        await self._hub.add([c for c in missing if c != self._hand_channel], self._wakeups)
        # Stay subscribed: a worker fetches from the same queues all its life.
        self._wake_subscribed.update(missing)

    async def _claim_once(
        self, queues: list[str], limit: int, token: str, waiter: str = "", wait_s: float = 0.0
    ) -> tuple[list[Delivery], float | None]:
        """One claim script call. ``token`` names the call: the same token returns the same leases.
        With ``wait_s`` > 0 and nothing ready, ``waiter`` is registered as waiting on the queues."""
        hand = self._hand_channel.decode() if wait_s > 0 and self._hub.started else ""
        args: list[Arg] = [token, repr(float(self.lease_s)), limit, waiter, repr(wait_s), hand, *queues]
        return claimed(await self._claim(args))

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._script_ack(ack_args(deliveries))

    def refills_with(self, store: Store) -> bool:
        # The results live here too: states, acks and the next claim go in one script.
        return isinstance(store, RedisStore) and store.url == self.url and store.namespace == self.namespace

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None = None,
    ) -> list[Delivery]:
        if not self.refills_with(store):
            return await super().store_and_ack(store, states, ttl_s, final, deliveries, refill)
        # The results live here too: states, acks and the next claim in one script, in that order.
        args = settle_args(states, ttl_s, final, deliveries)
        if refill is not None:
            queues, limit = refill
            args += [uuid.uuid4().hex, repr(float(self.lease_s)), limit, *dict.fromkeys(queues)]
        return claimed(await self._settle(args))[0]

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        args = [
            delivery.id, receipt(delivery), "0" if body is None else "1", body or b"", repr(max(float(delay_s), 0.0)),
        ]  # fmt: skip
        await self._script_requeue(args)

    async def _extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        args: list[str] = [repr(float(self.lease_s))]
        for d in deliveries:
            args += [d.id, receipt(d)]
        lost = {text(i) for i in await self._script_extend(args)}
        return [d for d in deliveries if d.id in lost]

    # -- management (see admin) ------------------------------------------------------------
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._admin.dead_letter(delivery, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._admin.dead_letters(limit)

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        return await self._admin.replay(ids)

    async def cancel(self, message_id: str) -> bool:
        return await self._admin.cancel(message_id)

    async def purge(self, queue: str) -> int:
        return await self._admin.purge(queue)

    async def stats(self) -> QueueStats:
        return await self._admin.stats()

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        return await self._admin.due_within(queues, within_s)

    async def flush_namespace(self) -> None:
        await self._admin.flush()
