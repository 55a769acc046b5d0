"""What RabbitMQ cannot do, done with the key-value primitives of the bound `Store`
(`AmqpBroker.bind_store`, called before `connect`):

* dedup keys: ``set_if_absent`` at enqueue, deleted at ack or dead letter;
* cancellation: each message has a claim key; a fetch writes "leased" (for all the messages
  it hands out, in one `set_many_if_absent`), `cancel` writes "revoked", and whoever writes
  first wins. `cancel` is True only when it won, so only when the message was never handed
  out (or was put back by `requeue`); a revoked message is dropped when it reaches a consumer.
  An id this broker never saw also gives True. Claims expire after 7 days;
* a registry of the namespace's queue names, so `stats`, `purge` and `flush_namespace` in
  another process know them.

Without a store, a keyed enqueue raises `ConfigError` and `cancel` returns False.
"""

from __future__ import annotations

import itertools
import time

from offload.brokers.base import OutgoingMessage, Store
from offload.config import BrokerURL
from offload.errors import BrokerError, ConfigError

CLAIM_TTL_S = 7 * 86400.0
# A message that expires in RabbitMQ is dead-lettered there without reaching us, so its dedup
# key cannot be released at ack: the key of a message with ``expires`` lapses this long after.
KEY_GRACE_S = 3600.0

LEASED = b"leased"
REVOKED = b"revoked"


def claim_key(message_id: str) -> str:
    return f"amqp:claim:{message_id}"


def dedup_key(key: str) -> str:
    return f"amqp:key:{key}"


def key_of(message_id: str) -> str:
    """Where the dedup key a message holds is written, for `cancel` to release it."""
    return f"amqp:key-of:{message_id}"


def registry_slot(i: int) -> str:
    return f"amqp:queues:{i}"


class Records:
    """Dedup keys, claims and the queue registry, in the bound store (see the module docstring)."""

    def __init__(self, url: BrokerURL) -> None:
        self.url = url
        self.store: Store | None = None

    # -- dedup keys -----------------------------------------------------------------------------
    async def hold_key(self, message: OutgoingMessage) -> str | None:
        """Take the message's dedup key; the id of the message holding it when taken."""
        assert message.key is not None
        if self.store is None:
            raise ConfigError(
                f"dedup keys on {self.url.masked} need a result store: pass results='redis://...' to Offload()"
            )
        ttl = message.expires - time.time() + KEY_GRACE_S if message.expires is not None else None
        slot = dedup_key(message.key)
        for _ in range(5):
            if await self.store.set_if_absent(slot, message.id.encode(), ttl_s=ttl):
                await self.store.set_if_absent(key_of(message.id), message.key.encode(), ttl_s=CLAIM_TTL_S)
                return None
            holder = await self.store.get_value(slot)
            if holder is not None:
                return holder.decode()
        raise BrokerError(f"dedup key {message.key!r} keeps changing hands; try again")

    async def release_key(self, key: str | None, message_id: str) -> None:
        if key is None or self.store is None:
            return
        holder = await self.store.get_value(dedup_key(key))
        if holder is not None and holder.decode() == message_id:
            await self.store.delete_value(dedup_key(key))
        await self.store.delete_value(key_of(message_id))

    # -- claims ---------------------------------------------------------------------------------
    @staticmethod
    def claims(message_ids: list[str]) -> list[tuple[str, bytes]]:
        """The claim keys a hand-out writes (if absent), with their value."""
        return [(claim_key(m), LEASED) for m in message_ids]

    async def claim(self, message_ids: list[str]) -> list[bool]:
        """Mark messages as handed out; True for each one a cancel got to first."""
        store = self.store
        if store is None or not message_ids:
            return [False] * len(message_ids)
        # One round trip for the whole fetch: the claim is on the way of every task.
        held = await store.set_many_if_absent(self.claims(message_ids), ttl_s=CLAIM_TTL_S)
        return [value == REVOKED for value in held]

    async def unclaim(self, message_id: str) -> None:
        """Let a message put back for another attempt be cancelled again."""
        if self.store is not None:
            await self.store.delete_value(claim_key(message_id))

    async def cancel(self, message_id: str) -> bool:
        if self.store is None:
            return False
        if not await self.store.set_if_absent(claim_key(message_id), REVOKED, ttl_s=CLAIM_TTL_S):
            return False  # handed out already (or cancelled before)
        key = await self.store.get_value(key_of(message_id))
        if key is not None:
            await self.release_key(key.decode(), message_id)
        return True

    # -- the queue registry ---------------------------------------------------------------------
    async def register(self, queue: str) -> None:
        """Add the queue name to the namespace's registry: slots 0, 1, 2... each taken once
        with set_if_absent, so concurrent processes never overwrite each other."""
        if self.store is None:
            return
        for i in itertools.count():
            slot = registry_slot(i)
            held = await self.store.get_value(slot)
            if held is None and await self.store.set_if_absent(slot, queue.encode()):
                return
            held = held if held is not None else await self.store.get_value(slot)
            if held is not None and held.decode() == queue:
                return

    async def registered(self) -> list[str]:
        names: list[str] = []
        if self.store is not None:
            for i in itertools.count():
                held = await self.store.get_value(registry_slot(i))
                if held is None:
                    break
                names.append(held.decode())
        return names

    async def clear_registry(self) -> None:
        if self.store is not None:
            for i in range(len(await self.registered())):
                await self.store.delete_value(registry_slot(i))
