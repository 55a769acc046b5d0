"""``amqp://user:password@host:port/vhost`` (and ``amqps://``): RabbitMQ, through aio-pika's
robust connections and channels (reconnection, declarations restored); messages are published
and consumed on their aiormq channels directly (see `_publish_once` and `_amqp_received`).

The virtual host is the URL's path, %-encoded (``/%2F`` or an empty path is ``/``). URL
parameters: ``connect_timeout`` (seconds of retrying before `BrokerUnavailable`, default 5),
``publish_timeout`` (how long an enqueue waits for a lost connection to come back, default 30),
``prefetch`` (unacknowledged deliveries per consumed queue; default: twice the first
`fetch`'s limit, see `_window`), ``sync_connections`` (connections of the sync face's sender,
see `amqp_direct`; default 4, 0 sends everything through the loop),
and for ``amqps://`` ``cafile``, ``certfile``, ``keyfile``.

Topology, everything durable and named after the namespace (``P`` is ``offload.{namespace}``)::

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

Fetching: a consumer per fetched queue, on a second connection (so that RabbitMQ's flow control
on publishers never holds back acks), pushes deliveries into a local buffer; `fetch` hands out
the buffered ones by priority, then queue order, then arrival. The prefetch bounds how many
deliveries per queue this process holds unacknowledged, handed out or not; RabbitMQ orders by
priority only what it has not pushed yet. A fetch for other queues than the last one cancels the
consumers it no longer needs and puts back what they had buffered. A busy worker's batches of
outcomes take its next messages from the buffer (the refill of `store_and_ack`), their claims
written in the same round trip as the outcomes, so it seldom claims on its own. An `ack` of several
deliveries sends one basic.ack with ``multiple`` for the run of delivery tags that no delivery
still held interrupts (see ``_amqp_acks``), and one frame each for the others.

What RabbitMQ cannot do is done with the key-value primitives of the bound `Store`
(`bind_store`, called before `connect`):

* dedup keys: ``set_if_absent`` at enqueue, deleted at ack or dead letter;
* cancellation: each message has a claim key; `fetch` writes "leased" (for all the messages
  it hands out, in one `set_many_if_absent`), `cancel` writes "revoked", and whoever writes
  first wins. `cancel` is True only when it won, so only when the
  message was never handed out (or was put back by `requeue`); a revoked message is dropped
  when it reaches a consumer. An id this broker never saw also gives True. Claims expire after
  7 days;
* a registry of the namespace's queue names, so `stats`, `purge` and `flush_namespace` in
  another process know them.

Without a store, a keyed enqueue raises `ConfigError` and `cancel` returns False.

Leases: RabbitMQ keeps a delivery unacknowledged until the consumer acks it or its channel
closes, then delivers it again (with the redelivered flag, counted in ``deliveries``). So there
is no lease to renew: `extend` does nothing and ``lease_s`` is unused. But RabbitMQ's
``consumer_timeout`` (30 minutes by default) closes the channel of a consumer that holds a
delivery longer, and the message runs again elsewhere: raise it in rabbitmq.conf (or with the
``x-consumer-timeout`` queue argument on RabbitMQ 3.12+) for tasks that run longer.

`stats().running` counts the deliveries this broker object holds: AMQP itself does not report
unacknowledged counts (the management API does).

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
import itertools
import logging
import os
import ssl
import time
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url

from offload.brokers._amqp_acks import TRANSIENT, Acker, Settled
from offload.brokers._amqp_received import Received
from offload.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    DirectSender,
    OutgoingMessage,
    QueueStats,
    Store,
    Verdict,
)
from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable, ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PRIORITY = 10
# Delay levels in milliseconds. Powers of two keep a delay's hop count at the number of 1 bits
# in it; the smallest level bounds how late a delayed message may arrive.
DELAY_LEVELS_MS: tuple[int, ...] = tuple(2**k for k in range(6, 25))
_DUE_SLACK_S = 0.002  # closer than this to its eta, a message is due
_CLAIM_TTL_S = 7 * 86400.0
# A message that expires in RabbitMQ is dead-lettered there without reaching us, so its dedup
# key cannot be released at ack: the key of a message with ``expires`` lapses this long after.
_KEY_GRACE_S = 3600.0
_RECONNECT_INTERVAL_S = 1.0
_RECLAIM_PAUSE_S = 1.0  # after a claim failed, before the messages are claimed again
_LOST_ACKS_KEPT = 10_000

_instances = itertools.count(1)

_LEASED = b"leased"
_REVOKED = b"revoked"

# Message headers. Not "x-" prefixed: headers exchanges ignore x- headers when matching.
_H_ID = "offload-id"
_H_QUEUE = "offload-queue"
_H_COPY = "offload-copy"  # unique per publish: tells a redelivered copy from a republished one
_H_DELIVERIES = "offload-deliveries"  # hand-outs before this copy was published
_H_ETA = "offload-eta"
_H_EXPIRES = "offload-expires"
_H_KEY = "offload-key"
_H_DELAY = "offload-delay-ms"
_H_REASON = "offload-reason"
_H_DIED_AT = "offload-died-at"

# Errors after which the same call can succeed once the connection is back.
_TRANSIENT = TRANSIENT

#: A delivery: a consumer's (`Received`) or basic.get's (aio-pika's message).
Incoming = AbstractIncomingMessage | Received

_PERSISTENT = 2  # delivery_mode: written to disk, confirmed once written
#: What a publish sends: the body and its AMQP properties.
Outgoing = tuple[bytes, aiormq.spec.Basic.Properties]


@dataclass(slots=True)
class _Buffered:
    """A delivery pushed by RabbitMQ that no `fetch` has handed out yet."""

    queue: str
    seq: int
    message: Incoming

    @property
    def priority(self) -> int:
        return int(self.message.priority or 0)


def _vhost(path: str) -> str:
    name = urllib.parse.unquote(path[1:] if path.startswith("/") else path)
    return name or "/"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _timestamp(epoch_s: float) -> str:
    # As text: pamqp sends a Python float as a 32-bit float, which rounds epoch seconds
    # to minutes.
    return f"{epoch_s:.6f}"


def _expiration(seconds: float) -> str:
    """The per-message TTL property: whole milliseconds, as text (at least 1: 0 means now)."""
    return str(max(int(seconds * 1000), 1))


def _priority(priority: int) -> int:
    return min(max(int(priority), 0), MAX_PRIORITY - 1)


def _level_ms(remaining_s: float) -> int:
    """The longest delay level that does not overshoot, or the shortest one."""
    remaining_ms = remaining_s * 1000.0
    fitting = [ms for ms in DELAY_LEVELS_MS if ms <= remaining_ms]
    return fitting[-1] if fitting else DELAY_LEVELS_MS[0]


def is_due(eta: float | None, now: float) -> bool:
    """Does a message with this eta go straight to its queue (rather than to a delay level)?"""
    return eta is None or eta <= now + _DUE_SLACK_S


def message_headers(
    message_id: str, queue: str, deliveries: int, *, key: str | None, expires: float | None, eta: float | None, now: float
) -> dict[str, Any]:
    """The offload headers of a published copy, but its copy token (`_H_COPY`)."""
    headers: dict[str, Any] = {_H_ID: message_id, _H_QUEUE: queue, _H_DELIVERIES: deliveries}
    if key is not None:
        headers[_H_KEY] = key
    if expires is not None:
        headers[_H_EXPIRES] = _timestamp(expires)
    if eta is not None and eta > now:
        # Due within the slack, it goes straight to its queue; the eta tells the consumer to
        # hold it back until then.
        headers[_H_ETA] = _timestamp(eta)
    return headers


def _is_stale(message: Incoming) -> bool:
    """True when the channel the message came on has closed: its delivery tag is void."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return True
    return False


async def _delete_queue(name: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.queue_delete(name)


async def _delete_exchange(name: str, channel: aiormq.abc.AbstractChannel) -> None:
    await channel.exchange_delete(name)


def _window(places: int) -> int:
    """RabbitMQ's prefetch for a worker with ``places`` (its first fetch's limit: running plus
    held). RabbitMQ sends a message only after the ack of another, so with exactly ``places``
    the next messages are still on their way when places free up, and each fetch claims one or
    two on its own. As many again wait in the buffer, where the acks' refill hands them out with
    their claims written beside the outcomes (`AmqpBroker.store_and_ack`). Half as many again
    was too few once a worker's threads took their next task without the loop: the buffer ran
    dry between batches and most claims went out on their own again."""
    places = max(places, 1)
    return places * 2


def _cancelled_from_outside() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AmqpBroker(Broker):
    """RabbitMQ broker; see the module docstring for the topology and the guarantees."""


    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        if url.scheme not in ("amqp", "amqps"):
            raise ConfigError(f"not an AMQP URL: {url.masked}")
        self._tls = url.scheme == "amqps"
        self._connect_timeout_s = url.param_float("connect_timeout", 5.0)
        self._publish_timeout_s = url.param_float("publish_timeout", 30.0)
        self._prefetch = int(url.param_float("prefetch", 0))
        self._prefix = f"offload.{namespace}"
        #: names this broker's connections in RabbitMQ ("{client_name} producer" and
        #: "{client_name} consumer"), to find them with rabbitmqctl list_connections
        self.client_name = f"offload {namespace} {os.getpid()}.{next(_instances)}"
        self._queue_args: dict[str, Any] = {
            "x-max-priority": MAX_PRIORITY,
            "x-dead-letter-exchange": self._dead_name,
            "x-queue-type": "classic",
        }
        self._store: Store | None = None

        self._conn: AbstractRobustConnection | None = None  # enqueue, admin
        self._consumer_conn: AbstractRobustConnection | None = None  # fetch, ack
        self._publisher: AbstractRobustChannel | None = None
        self._admin: aiormq.abc.AbstractChannel | None = None
        self._admin_lock = asyncio.Lock()  # basic.get browsing and acking on the admin channel
        self._consumer_lock = asyncio.Lock()
        self._consumer_channel: AbstractRobustChannel | None = None

        self._topology_ready = False
        self._declared: set[str] = set()
        self._consumers: dict[str, str] = {}  # queue -> consumer tag
        # Queues whose deliveries are wanted; set before basic.consume, whose first deliveries
        # may run before the consumer tag is known.
        self._active: set[str] = set()
        self._buffer: list[_Buffered] = []
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
        self._fetching = 0
        self._hopping: dict[str, int] = {}  # queue -> messages on their way to the next delay level
        self._background: set[asyncio.Task[Any]] = set()
        self._leased: dict[str, Delivery] = {}  # by copy token
        self._acks = Acker()  # every ack and nack of the consumer channel's deliveries
        # Copies whose ack was lost with their channel: when RabbitMQ hands them back to this
        # process, they are acked instead of run a second time.
        self._lost_acks: OrderedDict[str, None] = OrderedDict()

    # -- names --------------------------------------------------------------------------
    def _queue_name(self, queue: str) -> str:
        return f"{self._prefix}.{queue}"

    @property
    def _dead_name(self) -> str:
        return f"{self._prefix}:dead"

    @property
    def _delay_exchange(self) -> str:
        return f"{self._prefix}:delay"

    def _level_name(self, ms: int) -> str:
        return f"{self._prefix}:delay:{ms}"

    # -- store --------------------------------------------------------------------------
    def bind_store(self, store: Store) -> None:
        """Give the broker the key-value space it keeps dedup keys, claims and its queue
        registry in. Call it before `connect`."""
        self._store = store

    @staticmethod
    def _claim_key(message_id: str) -> str:
        return f"amqp:claim:{message_id}"

    @staticmethod
    def _dedup_key(key: str) -> str:
        return f"amqp:key:{key}"

    @staticmethod
    def _key_of(message_id: str) -> str:
        return f"amqp:key-of:{message_id}"

    @staticmethod
    def _registry_slot(i: int) -> str:
        return f"amqp:queues:{i}"

    async def _release_key(self, key: str | None, message_id: str) -> None:
        if key is None or self._store is None:
            return
        holder = await self._store.get_value(self._dedup_key(key))
        if holder is not None and holder.decode() == message_id:
            await self._store.delete_value(self._dedup_key(key))
        await self._store.delete_value(self._key_of(message_id))

    async def _register(self, queue: str) -> None:
        """Add the queue name to the namespace's registry: slots 0, 1, 2... each taken once
        with set_if_absent, so concurrent processes never overwrite each other."""
        if self._store is None:
            return
        for i in itertools.count():
            slot = self._registry_slot(i)
            held = await self._store.get_value(slot)
            if held is None and await self._store.set_if_absent(slot, queue.encode()):
                return
            held = held if held is not None else await self._store.get_value(slot)
            if held is not None and held.decode() == queue:
                return

    async def _registered(self) -> list[str]:
        names: list[str] = []
        if self._store is not None:
            for i in itertools.count():
                held = await self._store.get_value(self._registry_slot(i))
                if held is None:
                    break
                names.append(held.decode())
        return names

    async def _known_queues(self) -> list[str]:
        names = dict.fromkeys([*sorted(self._declared), *self._consumers, *await self._registered()])
        return list(names)

    # -- connections --------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        password = self.url.password
        if password:
            for form in {password, urllib.parse.quote(password, safe="")}:
                text = text.replace(form, "***")
        return text

    def _reason(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        return self._scrub(f"{type(error).__name__}: {text}" if text != type(error).__name__ else text)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self._tls:
            return None
        params = self.url.params
        context = ssl.create_default_context(cafile=params.get("cafile"))
        if params.get("certfile"):
            context.load_cert_chain(params["certfile"], params.get("keyfile"))
        return context

    async def _open_connection(self, role: str) -> AbstractRobustConnection:
        """A robust connection, or `BrokerUnavailable` after ``connect_timeout`` of retries."""
        amqp_url = make_url(
            host=self.url.host or "localhost",
            port=self.url.port or (5671 if self._tls else 5672),
            login=self.url.username or "guest",
            password=self.url.password or "guest",
            virtualhost=_vhost(self.url.path),
            ssl=self._tls,
        )
        deadline = time.monotonic() + self._connect_timeout_s
        pause = 0.1
        while True:
            left = max(deadline - time.monotonic(), 0.05)
            # What aio_pika.connect_robust does, but holding the connection object: a first
            # attempt cut short by the timeout must be closed, or its reconnection task lives on.
            conn = aio_pika.RobustConnection(
                amqp_url,
                ssl_context=self._ssl_context(),
                client_properties={"connection_name": f"{self.client_name} {role}"},
                reconnect_interval=_RECONNECT_INTERVAL_S,
                fail_fast="1",
            )
            try:
                await asyncio.wait_for(conn.connect(timeout=left), left)
                return conn
            except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError) as e:
                await self._discard(conn)
                raise BrokerUnavailable(self.url.masked, f"login refused: {self._reason(e)}") from None
            except aiormq.exceptions.InvalidFrameError as e:
                await self._discard(conn)
                if "Connection.OpenOk" not in str(e):
                    raise BrokerUnavailable(self.url.masked, self._reason(e)) from None
                # RabbitMQ answers connection.open with a close; aiormq drops its reply text.
                raise BrokerUnavailable(
                    self.url.masked,
                    f"RabbitMQ refused to open virtual host {_vhost(self.url.path)!r} "
                    "(does it exist, and may this user use it?)",
                ) from None
            except (*_TRANSIENT, aiormq.exceptions.AMQPError, RuntimeError) as e:
                await self._discard(conn)
                reason = self._reason(e)
            if time.monotonic() + pause >= deadline:
                # `from None`: the chained client error would repeat what `reason` says.
                raise BrokerUnavailable(
                    self.url.masked, f"{reason} (gave up after {self._connect_timeout_s:g} s)"
                ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    @staticmethod
    async def _discard(conn: AbstractRobustConnection) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    async def connect(self) -> None:
        if self._conn is not None:
            return
        self._conn = await self._open_connection("producer")
        try:
            # Returned (unroutable) messages raise, so an enqueue never vanishes into a
            # queue that was deleted behind this process's back.
            self._publisher = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            await self._ensure_topology()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        conns = [self._consumer_conn, self._conn]
        self._consumer_conn = self._conn = None
        self._consumer_channel = self._publisher = self._admin = None
        self._consumers.clear()
        self._active.clear()
        self._buffer.clear()
        self._hopping.clear()  # hops cancelled before they began never count themselves out
        self._leased.clear()
        self._acks.clear()
        self._topology_ready = False
        for conn in conns:
            if conn is not None:
                await self._discard(conn)

    def _require_conn(self) -> AbstractRobustConnection:
        if self._conn is None:
            raise BrokerError(f"the amqp broker for {self.url.masked} is not connected; call connect() first")
        return self._conn

    async def _admin_channel(self, deadline: float) -> aiormq.abc.AbstractChannel:
        """A plain (not robust) channel for declarations, reads and deletions. A failed
        declaration closes its channel; this one is simply opened again, with nothing to restore."""
        if self._admin is not None and not self._admin.is_closed:
            return self._admin
        conn = self._require_conn()
        await asyncio.wait_for(conn.ready(), max(deadline - time.monotonic(), 0.01))
        transport = conn.transport
        if transport is None:
            raise aiormq.exceptions.ChannelInvalidStateError("connection is reconnecting")
        self._admin = await transport.connection.channel(publisher_confirms=False)
        return self._admin

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``, waiting through a lost connection for up to ``publish_timeout``.
        May run ``call`` twice when a reply was lost: every caller is at-least-once safe."""
        deadline = time.monotonic() + self._publish_timeout_s
        pause = 0.05
        while True:
            try:
                return await call()
            except aiormq.exceptions.ChannelClosed:
                raise  # the server refused this call (404, 406...): retrying would not help
            except _TRANSIENT as e:
                reason = self._reason(e)
            except asyncio.CancelledError:
                # aiormq cancels the futures of a connection that dropped; only a
                # cancellation of this task itself must propagate.
                if _cancelled_from_outside():
                    raise
                reason = "connection lost"
            if time.monotonic() + pause >= deadline:
                raise BrokerUnavailable(
                    self.url.masked, f"cannot {what} within {self._publish_timeout_s:g} s: {reason}"
                ) from None
            log.info("%s: waiting for RabbitMQ (%s)", what, reason)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _admin_call(self, what: str, call: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]) -> T:
        async def attempt() -> T:
            return await call(await self._admin_channel(time.monotonic() + self._publish_timeout_s))

        return await self._retrying(what, attempt)

    # -- declarations -------------------------------------------------------------------
    async def _ensure_topology(self) -> None:
        if self._topology_ready:
            return

        async def declare(ch: aiormq.abc.AbstractChannel) -> None:
            await ch.exchange_declare(self._dead_name, exchange_type="fanout", durable=True)
            await ch.queue_declare(self._dead_name, durable=True, arguments={"x-queue-type": "classic"})
            await ch.queue_bind(self._dead_name, self._dead_name, routing_key="")
            await ch.exchange_declare(self._delay_exchange, exchange_type="headers", durable=True)
            for ms in DELAY_LEVELS_MS:
                # No priority here: with equal TTLs, a priority would let later messages
                # overtake earlier ones and hold them past their due time.
                name = self._level_name(ms)
                args: dict[str, Any] = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-queue-type": "classic"}
                await ch.queue_declare(name, durable=True, arguments=args)
                await ch.queue_bind(name, self._delay_exchange, arguments={"x-match": "all", _H_DELAY: str(ms)})

        try:
            await self._admin_call("declare the namespace's exchanges", declare)
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"RabbitMQ at {self.url.masked} holds {self._prefix}:* exchanges or queues declared "
                f"otherwise than offload declares them ({self._scrub(str(e))}); delete them or use another namespace"
            ) from None
        self._topology_ready = True

    async def _declare(self, queue: str) -> None:
        if queue in self._declared:
            return
        name = self._queue_name(queue)
        try:
            await self._admin_call(
                f"declare queue {name}",
                lambda ch: ch.queue_declare(name, durable=True, arguments=self._queue_args),
            )
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"queue {name!r} on {self.url.masked} already exists, declared otherwise than offload "
                f"needs (x-max-priority={MAX_PRIORITY}, x-dead-letter-exchange={self._dead_name}, classic); "
                f"RabbitMQ says: {self._scrub(str(e))}. Priorities would be ignored on it: delete it "
                f"(rabbitmqctl delete_queue {name}) or use another queue name"
            ) from None
        self._declared.add(queue)
        await self._register(queue)

    # -- publishing ---------------------------------------------------------------------
    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        build: Callable[[], Outgoing],
        redeclare: Callable[[], Awaitable[None]],
    ) -> None:
        """Publish with a broker confirm; wait through reconnections. A message RabbitMQ
        cannot route (its queue or exchange was deleted elsewhere) is declared again, once."""
        redeclared = False
        while True:
            try:
                await self._retrying(
                    f"publish to {routing_key}", partial(self._publish_once, exchange, routing_key, build)
                )
                return
            except (aiormq.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity) as e:
                if redeclared:
                    raise BrokerError(
                        f"RabbitMQ at {self.url.masked} cannot route to {routing_key!r}: {self._reason(e)}"
                    ) from None
                redeclared = True
                await redeclare()
            except aiormq.exceptions.DeliveryError as e:
                raise BrokerError(
                    f"RabbitMQ at {self.url.masked} refused a message for {routing_key!r}: {self._reason(e)}"
                ) from None

    async def _publish_once(self, exchange: str, routing_key: str, build: Callable[[], Outgoing]) -> None:
        self._require_conn()
        channel = self._publisher
        if channel is None:
            raise aiormq.exceptions.ChannelInvalidStateError("no publisher channel")
        if channel.is_closed:  # reopening after a lost connection or a channel error
            await asyncio.wait_for(channel.ready(), self._publish_timeout_s)
        # Straight to aiormq with the properties built here: aio-pika's Message and Exchange
        # would only check and copy them (about 25 us per message). A missing exchange fails
        # like a missing queue and is declared again by `_publish`; a return (mandatory) or a
        # nack raises as it does through aio-pika, since the channel is the same.
        body, properties = build()
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties,
            mandatory=True, timeout=self._publish_timeout_s,
        )

    async def _send(
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
        await self._declare(queue)
        now = time.time()
        headers = message_headers(message_id, queue, deliveries, key=key, expires=expires, eta=eta, now=now)
        exchange = ""
        expiration: str | None = None
        if eta is not None and not is_due(eta, now):
            await self._ensure_topology()
            headers[_H_DELAY] = str(_level_ms(eta - now))
            exchange = self._delay_exchange
            # Expiring in a delay level sends the message on to its queue early, where a worker
            # records it as expired. Not in the queue itself: RabbitMQ would dead-letter it
            # without any worker recording its state.
            expiration = _expiration(expires - now) if expires is not None else None

        def build() -> Outgoing:
            return body, aiormq.spec.Basic.Properties(
                headers={**headers, _H_COPY: uuid.uuid4().hex},
                priority=_priority(priority),
                delivery_mode=_PERSISTENT,
                message_id=message_id,
                expiration=expiration,
            )

        async def redeclare() -> None:
            self._declared.discard(queue)
            self._topology_ready = False
            await self._ensure_topology()
            await self._declare(queue)

        await self._publish(exchange, self._queue_name(queue), build, redeclare)

    async def _hold_key(self, message: OutgoingMessage) -> str | None:
        """Take the message's dedup key; the id of the message holding it when taken."""
        assert message.key is not None
        if self._store is None:
            raise ConfigError(
                f"dedup keys on {self.url.masked} need a result store: pass results='redis://...' to Offload()"
            )
        ttl = message.expires - time.time() + _KEY_GRACE_S if message.expires is not None else None
        slot = self._dedup_key(message.key)
        for _ in range(5):
            if await self._store.set_if_absent(slot, message.id.encode(), ttl_s=ttl):
                await self._store.set_if_absent(self._key_of(message.id), message.key.encode(), ttl_s=_CLAIM_TTL_S)
                return None
            holder = await self._store.get_value(slot)
            if holder is not None:
                return holder.decode()
        raise BrokerError(f"dedup key {message.key!r} keeps changing hands; try again")

    async def enqueue(self, message: OutgoingMessage) -> str:
        self._require_conn()
        if message.key is not None:
            holder = await self._hold_key(message)
            if holder is not None:
                return holder
        try:
            await self._send(
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
                    await self._release_key(message.key, message.id)
            raise
        return message.id

    # -- consuming ----------------------------------------------------------------------
    async def _start_consuming(self, queues: Sequence[str], limit: int) -> None:
        if self._consumer_conn is not None and all(q in self._consumers for q in queues):
            return  # the usual case, on every fetch of a running worker: nothing to take a lock for
        async with self._consumer_lock:
            if self._consumer_conn is None:
                self._require_conn()
                self._consumer_conn = await self._open_connection("consumer")
                channel = await self._consumer_conn.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self._prefetch or _window(limit))
                channel.reopen_callbacks.add(self._on_consumer_channel_reopened)
                self._consumer_channel = channel
            consumer_channel = self._consumer_channel
            assert consumer_channel is not None
            for queue in queues:
                if queue in self._consumers:
                    continue
                await self._declare(queue)
                # Declared again on the robust channel so that, after a reconnection, aio-pika
                # declares it before the consumers start again (`_on_consumer_channel_reopened`).
                await consumer_channel.declare_queue(self._queue_name(queue), durable=True, arguments=self._queue_args)
                self._active.add(queue)
                try:
                    self._consumers[queue] = await self._consume(queue)
                except BaseException:
                    self._active.discard(queue)
                    raise

    async def _consume(self, queue: str) -> str:
        """basic.consume on the consumer channel as it is now; the consumer tag."""
        assert self._consumer_channel is not None
        channel = await self._consumer_channel.get_underlay_channel()
        if self._on_consumer_cancelled not in channel.on_consumer_cancel_callbacks:
            channel.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
        ok = await channel.basic_consume(self._queue_name(queue), partial(self._on_delivered, queue))
        return str(ok.consumer_tag)

    def _on_consumer_channel_reopened(self, *_: Any) -> None:
        # After a reconnection (or a channel error) the robust channel has declared the queues
        # again and set the prefetch; the consumers are offload's own to start again.
        self._spawn(self._consume_again(list(self._consumers)))

    async def _on_consumer_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # RabbitMQ cancelled a consumer: its queue was deleted behind this process's back. It is
        # declared again and consumed anew. Called from the channel's reader, so it must not wait
        # for the channel itself.
        queue = next((q for q, tag in self._consumers.items() if tag == frame.consumer_tag), None)
        if queue is not None:
            self._declared.discard(queue)
            self._spawn(self._consume_again([queue], cancelled=frame.consumer_tag))

    async def _consume_again(self, queues: list[str], cancelled: str | None = None) -> None:
        pause = 0.1
        while queues:
            async with self._consumer_lock:
                wanted = [q for q in queues if q in self._consumers and (cancelled is None or self._consumers[q] == cancelled)]
                if self._consumer_channel is None or not wanted:
                    return
                try:
                    for queue in wanted:
                        if cancelled is not None:
                            await self._declare(queue)
                        self._consumers[queue] = await self._consume(queue)
                        queues.remove(queue)
                    return
                except (*_TRANSIENT, aiormq.exceptions.AMQPError) as e:
                    log.warning("could not consume %s again (%s); retrying in %.1f s", wanted, self._reason(e), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def _stop_consuming(self, keep: Sequence[str] = ()) -> None:
        """Cancel the consumers of queues not in ``keep`` and give back what they buffered."""
        async with self._consumer_lock:
            for queue in [q for q in self._consumers if q not in keep]:
                tag = self._consumers.pop(queue)
                self._active.discard(queue)
                with contextlib.suppress(*_TRANSIENT, aiormq.exceptions.AMQPError):
                    if self._consumer_channel is not None:
                        await (await self._consumer_channel.get_underlay_channel()).basic_cancel(tag)
            returned = [b for b in self._buffer if b.queue not in keep]
            self._buffer = [b for b in self._buffer if b.queue in keep]
        for item in returned:
            await self._give_back(item.message)

    async def _give_back(self, message: Incoming) -> None:
        # Nothing to do when its channel closed: RabbitMQ has put it back already.
        await self._acks.give_back(message)

    async def _on_delivered(self, queue: str, delivered: aiormq.abc.DeliveredMessage) -> None:
        self._on_message(queue, Received(delivered))

    def _on_message(self, queue: str, message: Incoming) -> None:
        # Never waits: what must wait (giving back, hopping) runs in a task of its own.
        self._acks.track(message)
        if queue not in self._active:
            self._spawn(self._give_back(message))  # raced with the consumer's cancellation
            return
        headers = message.headers or {}
        eta = _number(headers.get(_H_ETA))
        expires = _number(headers.get(_H_EXPIRES))
        now = time.time()
        expired = expires is not None and expires <= now
        if eta is not None and eta > now + _DUE_SLACK_S and not expired:
            # Back from a delay level too early: send it down the next one right away, so the
            # hops go on whether or not a fetch is waiting.
            self._hopping[queue] = self._hopping.get(queue, 0) + 1
            self._spawn(self._hop(queue, message))
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
            self._spawn(self._give_back(message))
            return
        self._buffer.append(_Buffered(queue, next(self._seq), message))
        self._arrived.set()

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` in a task that `close` cancels."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _hop(self, queue: str, message: Incoming) -> None:
        headers = message.headers or {}
        try:
            await self._send(
                message_id=_text(headers.get(_H_ID)) or message.message_id or "",
                queue=queue,
                body=message.body,
                priority=message.priority or 0,
                eta=_number(headers.get(_H_ETA)),
                expires=_number(headers.get(_H_EXPIRES)),
                key=_text(headers.get(_H_KEY)),
                deliveries=int(_number(headers.get(_H_DELIVERIES)) or 0),
            )
            # Lost with its channel, the old copy comes back and hops again: a duplicate
            # delivery, never a lost one.
            await self._acks.ack([message])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Sending failed after its own retries: back to the queue, to hop on its next delivery.
            log.warning("could not delay message %s further: %s", message.message_id, self._reason(e))
            await self._give_back(message)
        finally:
            left = self._hopping.get(queue, 0) - 1  # close() may have cleared the count
            if left > 0:
                self._hopping[queue] = left
            else:
                self._hopping.pop(queue, None)

    def direct_sender(self) -> DirectSender | None:
        if self._tls:
            return None  # amqps:// sends through the event loop, with its SSL context
        from offload.brokers.amqp_direct import AmqpDirect  # the sync client, only when used

        return AmqpDirect(self.url, self._queue_name, self._declared.__contains__, self.client_name, self._connect_timeout_s)

    def refills_with(self, store: Store) -> bool:
        return store is self._store  # the claims live there

    def local_ready(self, queues: Sequence[str]) -> int:
        wanted = set(queues)
        return sum(1 for b in self._buffer if b.queue in wanted)

    def _take(self, order: dict[str, int], limit: int) -> list[_Buffered]:
        live = [b for b in self._buffer if not _is_stale(b.message)]
        mine = sorted((b for b in live if b.queue in order), key=lambda b: (-b.priority, order[b.queue], b.seq))
        taken = mine[:limit]
        chosen = {id(b) for b in taken}
        self._buffer = [b for b in live if id(b) not in chosen]
        return taken

    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        self._require_conn()
        deadline = time.monotonic() + timeout_s
        self._fetching += 1
        try:
            if self._fetching == 1 and set(self._consumers) - set(queues):
                await self._stop_consuming(keep=queues)
            await self._start_consuming(queues, limit)
            order = {q: i for i, q in enumerate(queues)}
            while True:
                taken = self._take(order, limit)
                if taken:
                    handed = await self._admit(taken)
                    if handed:
                        return handed
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._arrived.clear()
                # asyncio.timeout rather than wait_for: no task per wait, and an idle worker
                # waits here once per delivery.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._arrived.wait()
        finally:
            self._fetching -= 1

    async def _admit(
        self, taken: list[_Buffered], claim: Callable[[list[str]], Awaitable[list[bool]]] | None = None
    ) -> list[Delivery]:
        """Turn buffered messages into deliveries, dropping revoked and already-acked copies.
        ``claim`` (default `_claim`) is called once, with the ids that need a claim. For a
        caller that `hands_out_early`, `_claim` is sent and the deliveries are handed out at
        once, each with its verdict to come (`Delivery.admitted`): the round trip overlaps with
        the worker starting the tasks, and the fetch loop is free sooner."""
        settled: set[int] = set()  # id() of the buffered items acked or merged here
        handed: list[Delivery] = []
        try:
            candidates: list[tuple[_Buffered, str, str]] = []
            for item in taken:
                headers = item.message.headers or {}
                copy = _text(headers.get(_H_COPY)) or f"?{id(item.message)}"
                message_id = _text(headers.get(_H_ID)) or item.message.message_id or copy
                running = self._leased.get(copy)
                if running is not None and _is_stale(running.receipt):
                    # Redelivered after this process's channel closed, while its task still
                    # runs here: the running delivery's ack now settles this delivery.
                    running.receipt = item.message
                    settled.add(id(item))
                elif copy in self._lost_acks:
                    del self._lost_acks[copy]
                    await self._acks.ack([item.message])
                    settled.add(id(item))
                    await self._release_key(_text(headers.get(_H_KEY)), message_id)
                else:
                    candidates.append((item, copy, message_id))
            if claim is None and self.hands_out_early:
                return self._admit_later(candidates)
            verdicts = await (claim or self._claim)([message_id for _, _, message_id in candidates])
            for (item, copy, message_id), revoked in zip(candidates, verdicts, strict=True):
                headers = item.message.headers or {}
                if revoked:
                    log.info("dropping cancelled message %s", message_id)
                    await self._acks.ack([item.message])
                    settled.add(id(item))
                    await self._release_key(_text(headers.get(_H_KEY)), message_id)
                    continue
                handed.append(self._hand_out(item, copy, message_id))
        except BaseException:
            # Nothing is handed out: keep every message not settled here in the buffer,
            # still unacknowledged, for the next fetch.
            for delivery in handed:
                self._forget(delivery)
            self._buffer.extend(item for item in taken if id(item) not in settled)
            raise
        return handed

    def _admit_later(self, candidates: list[tuple[_Buffered, str, str]]) -> list[Delivery]:
        if not candidates:
            return []
        loop = asyncio.get_running_loop()
        claim = self._spawn(self._claim([message_id for _, _, message_id in candidates]))
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
                log.warning("claiming %d message(s) failed (%s); trying again in %.1f s", len(handed), self._reason(error), _RECLAIM_PAUSE_S)
                for delivery in handed:
                    self._forget(delivery)
                loop.call_later(_RECLAIM_PAUSE_S, self._buffer_again, [item for item, _, _ in candidates])
            for i, verdict in enumerate(verdicts):
                if verdict.done():  # its worker stopped waiting (shutdown cancelled the wait)
                    continue
                if error is not None:
                    verdict.set_result(Verdict.TAKEN_BACK)
                else:
                    verdict.set_result(Verdict.REVOKED if done.result()[i] else Verdict.RUN)

        claim.add_done_callback(spread)
        return handed

    def _buffer_again(self, items: list[_Buffered]) -> None:
        for item in items:
            if item.queue in self._active and not _is_stale(item.message):
                self._buffer.append(item)
            # Otherwise its consumer or channel is gone, and RabbitMQ delivers it again.
        self._arrived.set()

    def _hand_out(self, item: _Buffered, copy: str, message_id: str) -> Delivery:
        headers = item.message.headers or {}
        deliveries = int(_number(headers.get(_H_DELIVERIES)) or 0) + 1 + int(bool(item.message.redelivered))
        delivery = Delivery(message_id, item.queue, item.message.body, deliveries, receipt=item.message)
        self._leased[copy] = delivery
        return delivery

    async def _claim(self, message_ids: list[str]) -> list[bool]:
        """Mark messages as handed out; True for each one a cancel got to first."""
        store = self._store
        if store is None or not message_ids:
            return [False] * len(message_ids)

        # One round trip for the whole fetch: the claim is on the way of every task.
        held = await store.set_many_if_absent(self._claims(message_ids), ttl_s=_CLAIM_TTL_S)
        return [value == _REVOKED for value in held]

    def _claims(self, message_ids: list[str]) -> list[tuple[str, bytes]]:
        return [(self._claim_key(m), _LEASED) for m in message_ids]

    # -- settling -----------------------------------------------------------------------
    def _forget(self, delivery: Delivery) -> None:
        if delivery.receipt is None:
            return
        copy = _text((delivery.receipt.headers or {}).get(_H_COPY))
        if copy is not None and self._leased.get(copy) is delivery:
            del self._leased[copy]

    async def _settle(self, deliveries: Sequence[Delivery], *, release_key: bool) -> None:
        messages: list[Incoming] = []
        for delivery in deliveries:
            if delivery.receipt is None:
                raise BrokerError(f"delivery {delivery.id} did not come from this amqp broker")
            messages.append(delivery.receipt)
        for delivery in deliveries:
            self._forget(delivery)
        # One batch: the acks of a run of delivery tags go out as one frame.
        outcomes = await self._acks.ack(messages)
        for delivery, message, outcome in zip(deliveries, messages, outcomes, strict=True):
            headers = message.headers or {}
            if outcome is Settled.LOST:
                copy = _text(headers.get(_H_COPY))
                if copy is not None:
                    self._lost_acks[copy] = None
                    while len(self._lost_acks) > _LOST_ACKS_KEPT:
                        self._lost_acks.popitem(last=False)
                log.warning(
                    "ack of %s lost with its channel: RabbitMQ will deliver it again (a copy coming back "
                    "to this process is acked on arrival)",
                    delivery.id,
                )
            elif outcome is Settled.ACKED and release_key:
                await self._release_key(_text(headers.get(_H_KEY)), delivery.id)

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle(deliveries, release_key=True)

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[tuple[str, bytes]],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None = None,
    ) -> list[Delivery]:
        """Store the outcomes, then ack. A refill hands out buffered messages of its queues
        (RabbitMQ pushed them while the tasks ran, see `_window`), their claims written in the
        same round trip as the outcomes: a busy worker claims nothing on its own."""
        taken: list[_Buffered] = []
        if refill is not None and states and self.refills_with(store):
            queues, limit = refill
            taken = self._take({q: i for i, q in enumerate(queues)}, limit)
        if taken:

            async def claim_with_states(message_ids: list[str]) -> list[bool]:
                held = await store.put_states_and_set_many_if_absent(
                    states, ttl_s, final, self._claims(message_ids), _CLAIM_TTL_S
                )
                return [value == _REVOKED for value in held]

            handed = await self._admit(taken, claim_with_states)
        else:
            handed = []
            if states:
                await store.put_states(states, ttl_s, final)
        if deliveries:
            try:
                await self.ack(deliveries)
            except BaseException:
                # The refill is not handed out after all: back to the buffer, for a fetch (a
                # claim that is already ours does not stop it).
                receipts = {id(d.receipt) for d in handed}
                for delivery in handed:
                    self._forget(delivery)
                self._buffer.extend(item for item in taken if id(item.message) in receipts)
                raise
        return handed

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        message = delivery.receipt
        if message is None:
            raise BrokerError(f"delivery {delivery.id} did not come from this amqp broker")
        headers = message.headers or {}
        if self._store is not None:
            # Waiting for its next attempt, the message may be cancelled again.
            await self._store.delete_value(self._claim_key(delivery.id))
        # The new copy is confirmed before the old one is acked: a crash in between runs the
        # task twice rather than never.
        await self._send(
            message_id=delivery.id,
            queue=delivery.queue,
            body=delivery.body if body is None else body,
            priority=message.priority or 0,
            eta=time.time() + delay_s if delay_s > 0 else None,
            expires=_number(headers.get(_H_EXPIRES)),
            key=_text(headers.get(_H_KEY)),
            deliveries=delivery.deliveries,
        )
        await self._settle([delivery], release_key=False)

    async def _extend(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to do: RabbitMQ holds a delivery until its ack or until its channel closes
        (mind ``consumer_timeout``, see the module docstring)."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        message = delivery.receipt
        if message is None:
            raise BrokerError(f"delivery {delivery.id} did not come from this amqp broker")
        headers = message.headers or {}
        await self._ensure_topology()
        dead_headers: dict[str, Any] = {
            _H_ID: delivery.id,
            _H_QUEUE: delivery.queue,
            _H_REASON: reason,
            _H_DIED_AT: _timestamp(time.time()),
            _H_DELIVERIES: delivery.deliveries,
        }
        key = _text(headers.get(_H_KEY))
        if key is not None:
            dead_headers[_H_KEY] = key

        def build() -> Outgoing:
            return delivery.body, aiormq.spec.Basic.Properties(
                headers={**dead_headers, _H_COPY: uuid.uuid4().hex},
                delivery_mode=_PERSISTENT,
                message_id=delivery.id,
            )

        async def redeclare() -> None:
            self._topology_ready = False
            await self._ensure_topology()

        await self._publish(self._dead_name, self._queue_name(delivery.queue), build, redeclare)
        await self._settle([delivery], release_key=True)

    # -- reading queues with basic.get --------------------------------------------------
    async def _get(self, queue_name: str, *, no_ack: bool) -> Incoming | None:
        """One message from a queue, None when empty (or when the queue does not exist)."""

        async def call(ch: aiormq.abc.AbstractChannel) -> Incoming | None:
            got = await ch.basic_get(queue_name, no_ack=no_ack)
            if isinstance(got.delivery, aiormq.spec.Basic.GetEmpty):
                return None
            return aio_pika.IncomingMessage(got, no_ack=no_ack)

        try:
            # Not retried: a browse cannot resume on a new channel, where what it held
            # unacknowledged has gone back to the queue.
            return await call(await self._admin_channel(time.monotonic() + self._publish_timeout_s))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None

    async def _browse(
        self, queue_name: str, take: Callable[[Incoming], bool]
    ) -> list[Incoming]:
        """Read a whole queue; remove and return the messages ``take`` accepts, put the others
        back in their places (RabbitMQ requeues to the original position)."""
        taken: list[Incoming] = []
        kept: list[Incoming] = []
        try:
            while (message := await self._get(queue_name, no_ack=False)) is not None:
                (taken if take(message) else kept).append(message)
        finally:
            for message in kept:
                await self._give_back(message)
        for message in taken:
            await message.ack()
        return taken

    def _as_dead_letter(self, message: Incoming) -> DeadLetter:
        headers = message.headers or {}
        reason = _text(headers.get(_H_REASON))
        died_at = _number(headers.get(_H_DIED_AT))
        deaths = headers.get("x-death")
        if reason is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            # Dead-lettered by RabbitMQ itself (an expired message).
            cause = _text(deaths[0].get("reason")) or "dead-lettered"
            reason = "expired before it started" if cause == "expired" else f"dead-lettered by RabbitMQ: {cause}"
            when = deaths[0].get("time")
            died_at = when.timestamp() if isinstance(when, datetime) else died_at
        queue = _text(headers.get(_H_QUEUE))
        if queue is None:
            routing_key = message.routing_key or ""
            queue = routing_key.removeprefix(f"{self._prefix}.")
        return DeadLetter(
            id=_text(headers.get(_H_ID)) or message.message_id or "",
            queue=queue,
            body=message.body,
            reason=reason or "unknown",
            died_at=died_at if died_at is not None else 0.0,
        )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._require_conn()
        async with self._admin_lock:
            browsed: list[DeadLetter] = []

            def look(message: Incoming) -> bool:
                browsed.append(self._as_dead_letter(message))
                return False

            await self._browse(self._dead_name, look)
        return sorted(browsed, key=lambda d: d.died_at, reverse=True)[:limit]

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        self._require_conn()
        wanted = None if ids is None else set(ids)
        async with self._admin_lock:
            taken = await self._browse(
                self._dead_name, lambda m: wanted is None or self._as_dead_letter(m).id in wanted
            )
        letters = [self._as_dead_letter(m) for m in taken]
        for message, letter in zip(taken, letters, strict=True):
            # A message RabbitMQ expired still holds its dedup key.
            await self._release_key(_text((message.headers or {}).get(_H_KEY)), letter.id)
        return letters

    # -- cancel, purge, stats, flush ----------------------------------------------------
    async def cancel(self, message_id: str) -> bool:
        self._require_conn()
        if self._store is None:
            return False
        if not await self._store.set_if_absent(self._claim_key(message_id), _REVOKED, ttl_s=_CLAIM_TTL_S):
            return False  # handed out already (or cancelled before)
        key = await self._store.get_value(self._key_of(message_id))
        if key is not None:
            await self._release_key(key.decode(), message_id)
        return True

    async def purge(self, queue: str) -> int:
        """Removes the queue's ready messages, its scheduled ones in the delay levels and the
        ones this process buffered, one by one so that their dedup keys are released."""
        self._require_conn()
        name = self._queue_name(queue)
        removed: list[Incoming] = []
        async with self._admin_lock:
            while (message := await self._get(name, no_ack=True)) is not None:
                removed.append(message)
            for ms in DELAY_LEVELS_MS:
                removed += await self._browse(self._level_name(ms), lambda m: m.routing_key == name)
        buffered = [b.message for b in self._buffer if b.queue == queue and not _is_stale(b.message)]
        self._buffer = [b for b in self._buffer if b.queue != queue]
        await self._acks.ack(buffered)
        removed += buffered
        for message in removed:
            headers = message.headers or {}
            await self._release_key(_text(headers.get(_H_KEY)), _text(headers.get(_H_ID)) or "")
        return len(removed)

    async def _depth(self, queue_name: str) -> int:
        async def call(ch: aiormq.abc.AbstractChannel) -> int:
            ok = await ch.queue_declare(queue_name, passive=True)
            return int(ok.message_count or 0)

        try:
            return await self._admin_call(f"read the depth of {queue_name}", call)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0

    async def stats(self) -> QueueStats:
        self._require_conn()
        out = QueueStats()
        for queue in await self._known_queues():
            depth = await self._depth(self._queue_name(queue))
            depth += sum(1 for b in self._buffer if b.queue == queue)
            if depth:
                out.queued[queue] = depth
        for ms in DELAY_LEVELS_MS:
            out.scheduled += await self._depth(self._level_name(ms))
        out.running = len(self._leased)
        out.dead = await self._depth(self._dead_name)
        return out

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        """An estimate from the depths of the delay levels. A message enters the longest level
        not longer than its delay, so one in the level of L ms is due within 2L: the levels up
        to ``within_s`` count, whatever queue their messages go back to (a level does not say),
        and a message of a longer level counts once it has hopped down to one of them. Also
        counted: a message between two levels in this process, and ready messages of
        ``queues`` not yet pushed to a consumer."""
        self._require_conn()
        if any(self._hopping.get(q) for q in queues):
            return True
        for ms in DELAY_LEVELS_MS:
            if ms > within_s * 1000:
                break
            if await self._depth(self._level_name(ms)):
                return True
        for queue in dict.fromkeys(queues):
            if await self._depth(self._queue_name(queue)):
                return True
        return False

    async def flush_namespace(self) -> None:
        """Delete the namespace's queues (those this process declared and those in the
        registry) and exchanges. Other processes' consumers should be stopped first: aio-pika
        declares the queue of a consumer again when its queue is deleted under it."""
        self._require_conn()
        queues = await self._known_queues()
        # The consumer connection goes first, so that no reconnection declares its queues again.
        async with self._consumer_lock:
            consumer_conn, self._consumer_conn, self._consumer_channel = self._consumer_conn, None, None
            self._consumers.clear()
            self._active.clear()
            self._buffer.clear()
            self._acks.clear()
        if consumer_conn is not None:
            await self._discard(consumer_conn)
        names = [
            *(self._queue_name(q) for q in queues),
            *(self._level_name(ms) for ms in DELAY_LEVELS_MS),
            self._dead_name,
        ]
        for name in names:
            await self._admin_call(f"delete queue {name}", partial(_delete_queue, name))
        for exchange in (self._delay_exchange, self._dead_name):
            await self._admin_call(f"delete exchange {exchange}", partial(_delete_exchange, exchange))
        if self._store is not None:
            for i in range(len(await self._registered())):
                await self._store.delete_value(self._registry_slot(i))
        self._declared.clear()
        self._topology_ready = False
        self._leased.clear()
        self._lost_acks.clear()


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return AmqpBroker(url, namespace)
