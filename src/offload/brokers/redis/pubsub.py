"""Pub/sub: one connection per broker or store object, shared by all its waiters.

`Hub` holds the connection and the channels wanted, each with its sinks (a `Sink` is whatever
wants a channel's messages: the broker's wake-ups and hand-offs, a store's watches and
channel subscriptions). When the connection drops it is rebuilt, resubscribed, and every sink
is reset once, so that each waiter re-reads what it waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from offload.brokers.redis.connection import CONNECT_BUDGET_S, reason

__all__ = ["Flag", "Hub", "Sink"]

log = logging.getLogger("offload.brokers.redis")

# The pub/sub connection is idle most of the time; ping it after this much silence and
# rebuild it when the ping goes unanswered, so a half-open connection is noticed.
_PUBSUB_IDLE_S = 10.0
_UNSUBSCRIBE_AFTER_S = 0.5


class Sink(Protocol):
    def deliver(self, channel: bytes, data: bytes) -> None:
        """A message arrived on a channel this sink is registered for."""

    def reset(self) -> None:
        """The connection was rebuilt; messages may have been missed."""


class Flag:
    """An event with "was it set since I last looked" semantics, for one waiter at a time."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        if not self._event.is_set():
            if timeout_s <= 0:
                return False
            try:
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        return True


class Hub:
    """One pub/sub connection shared by every waiter of one broker or store object.

    Thousands of watchers cost one connection and one SUBSCRIBE per distinct channel. `add`
    returns once the server has processed the SUBSCRIBE (a PING sent behind it has come back),
    so a message published afterwards reaches the sink. When the connection drops, the reader
    rebuilds it, resubscribes every channel still wanted and resets every sink.
    """

    def __init__(self, client: Redis, masked: str) -> None:
        self._client = client
        self._masked = masked
        self._sinks: dict[bytes, set[Sink]] = {}
        self._unsub: set[bytes] = set()  # no sinks left; UNSUBSCRIBE not sent yet
        self._ps: PubSub | None = None  # the live connection; None while reconnecting
        self._wlock = asyncio.Lock()  # keeps SUBSCRIBE/UNSUBSCRIBE/PING in the order decided
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._resync: bytes | None = None  # the PING closing a resubscription after a drop
        self._seq = 0
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        return self._reader is not None

    async def start(self) -> None:
        """Open the connection (redis errors propagate) and start reading."""
        async with self._start_lock:
            if self._reader is not None:
                return
            ps = self._client.pubsub()
            try:
                await ps.connect()  # type: ignore[no-untyped-call]
                await _send(ps, [("PING", b"start")])
                reply = await _read(ps, CONNECT_BUDGET_S)
                if reply is None:
                    raise RedisTimeoutError("no reply to PING")
            except BaseException:
                await _close_pubsub(ps)
                raise
            self._ps = ps
            self._reader = asyncio.create_task(self._run(), name=f"offload-redis-pubsub {self._masked}")

    async def add(self, channels: Sequence[bytes], sink: Sink) -> None:
        fresh: list[bytes] = []
        for c in channels:
            group = self._sinks.get(c)
            if group is None:
                group = self._sinks[c] = set()
                if c in self._unsub:
                    self._unsub.discard(c)  # still subscribed on the server
                else:
                    fresh.append(c)
            group.add(sink)
        try:
            await self._sync(fresh)
        except BaseException:
            self.remove(channels, sink)
            raise

    def remove(self, channels: Iterable[bytes], sink: Sink) -> None:
        for c in channels:
            group = self._sinks.get(c)
            if group is None:
                continue
            group.discard(sink)
            if not group:
                del self._sinks[c]
                self._unsub.add(c)
        if self._unsub and not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_unsubscribes())

    async def close(self) -> None:
        self._closed = True
        for task in (self._reader, self._flusher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reader = self._flusher = None
        self._release_barriers()
        if self._ps is not None:
            await _close_pubsub(self._ps)
            self._ps = None

    def _token(self) -> bytes:
        self._seq += 1
        return b"sync-%d" % self._seq

    def _release_barriers(self) -> None:
        for fut in self._barriers.values():
            if not fut.done():
                fut.set_result(None)
        self._barriers.clear()

    async def _sync(self, fresh: list[bytes]) -> None:
        async with self._wlock:
            ps = self._ps
            if ps is None:
                return  # reconnecting: the resubscription covers these channels and resets sinks
            if not fresh and not self._barriers and self._resync is None:
                return  # every SUBSCRIBE sent so far has been confirmed
            token = self._token()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._barriers[token] = fut
            try:
                commands: list[tuple[bytes | str, ...]] = [("SUBSCRIBE", *fresh)] if fresh else []
                await _send(ps, [*commands, ("PING", token)])
            except (RedisError, OSError):
                # The reader sees the broken connection too; it resubscribes and resets sinks.
                self._barriers.pop(token, None)
                return
        await fut

    async def _flush_unsubscribes(self) -> None:
        while self._unsub:
            # Gather the channels given up meanwhile into one write, and keep a channel that is
            # watched again soon (a client re-entering a watch) from costing two round trips.
            await asyncio.sleep(_UNSUBSCRIBE_AFTER_S)
            async with self._wlock:
                gone = [c for c in self._unsub if c not in self._sinks]
                self._unsub.clear()
                ps = self._ps
                if ps is None or not gone:
                    continue
                try:
                    await _send(ps, [("UNSUBSCRIBE", *gone[i : i + 500]) for i in range(0, len(gone), 500)])
                except (RedisError, OSError):
                    return  # the new connection subscribes only the channels still wanted

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        pinged = False
        while not self._closed:
            ps = self._ps
            try:
                if ps is None:
                    ps = await self._reconnect()
                    last_rx, pinged = loop.time(), False
                reply = await _read(ps, _PUBSUB_IDLE_S)
                if reply is None:
                    if pinged and loop.time() - last_rx > 2 * _PUBSUB_IDLE_S:
                        raise RedisConnectionError("no reply to PING on the pub/sub connection")
                    async with self._wlock:
                        await _send(ps, [("PING", b"idle")])
                    pinged = True
                    continue
                last_rx, pinged = loop.time(), False
                self._dispatch(reply)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a reader that dies silently would strand every waiter
                if self._closed:
                    return
                log.warning("redis pub/sub connection to %s lost (%s); reconnecting", self._masked, reason(e))
                await self._drop(ps)

    def _dispatch(self, reply: Any) -> None:
        # Raw replies: [b"message", channel, data], [b"subscribe", channel, n]..., and the
        # answer to PING <token>: [b"pong", token] under RESP2 while subscribed, else the token.
        if isinstance(reply, bytes):
            kind, token = b"pong", reply
        else:
            kind, token = reply[0], reply[1]
        if kind == b"message":
            channel, data = reply[1], reply[2]
            for sink in tuple(self._sinks.get(channel, ())):
                try:
                    sink.deliver(channel, data)
                except Exception:
                    log.exception("pub/sub handler failed on %r", channel)
        elif kind == b"pong":
            if token == self._resync:
                self._resync = None
                self._reset_sinks()
            fut = self._barriers.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _reset_sinks(self) -> None:
        for sink in {s for group in self._sinks.values() for s in group}:
            try:
                sink.reset()
            except Exception:
                log.exception("pub/sub reset handler failed")

    async def _drop(self, ps: PubSub | None) -> None:
        async with self._wlock:
            if self._ps is ps:
                self._ps = None
            self._resync = None
            self._unsub.clear()
            # Waiters return now; their sinks are reset once the new connection is subscribed.
            self._release_barriers()
        if ps is not None:
            await _close_pubsub(ps)

    async def _reconnect(self) -> PubSub:
        delay = 0.05
        while True:
            ps = self._client.pubsub()
            try:
                await ps.connect()  # type: ignore[no-untyped-call]
                async with self._wlock:
                    channels = list(self._sinks)
                    # The PING's reply tells the reader when every channel is subscribed again.
                    self._resync = token = self._token()
                    commands: list[tuple[bytes | str, ...]] = [
                        ("SUBSCRIBE", *channels[i : i + 500]) for i in range(0, len(channels), 500)
                    ]
                    await _send(ps, [*commands, ("PING", token)])
                    self._ps = ps
                log.info("redis pub/sub connection to %s restored", self._masked)
                return ps
            except (RedisError, OSError) as e:
                await _close_pubsub(ps)
                log.debug("redis pub/sub reconnect to %s failed: %s", self._masked, reason(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _send(ps: PubSub, commands: Sequence[tuple[bytes | str, ...]]) -> None:
    """Write commands on the pub/sub connection in one go; the reader task reads the replies."""
    conn = ps.connection
    if conn is None:
        raise RedisConnectionError("pub/sub connection closed")
    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)


async def _read(ps: PubSub, timeout_s: float) -> Any:
    """The next raw reply on the pub/sub connection, or None after ``timeout_s`` of silence.

    Read from the connection itself: PubSub's own read path would quietly reconnect after an
    error, to a connection subscribed to nothing, before reporting the error."""
    conn = ps.connection
    if conn is None:
        raise RedisConnectionError("pub/sub connection closed")
    # push_request: under RESP3 published messages arrive as pushes, not replies.
    return await conn.read_response(timeout=timeout_s, push_request=True)


async def _close_pubsub(ps: PubSub) -> None:
    with contextlib.suppress(Exception):
        await ps.aclose()  # type: ignore[no-untyped-call, unused-ignore]
