"""Pub/sub channels for browsers: one store subscription per channel, shared by every client.

However many browsers follow a channel through this gateway, it holds one subscription to it
and keeps the last `BUFFER` messages, each numbered. A position in a channel is a cursor,
``<epoch>:<number>``, where the epoch names the subscription: a long-polling client sends its
cursor back and gets what came after it, and an SSE client gets the same through
``Last-Event-ID`` when it reconnects. Between two polls nobody is connected, so a channel
stays subscribed for `LINGER_S` after its last client leaves.

Pub/sub itself keeps nothing: a message published while the gateway was not subscribed is
lost, and the answer says so (``"reset": true``) when a cursor cannot be honoured.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from offload.app import Offload
from offload.gateway.payload import dumps
from offload.serializers import to_plain

log = logging.getLogger("offload.gateway")

BUFFER = 256
LINGER_S = 30.0


class Channel:
    """One subscribed channel: its numbered recent messages and a way to wait for more."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = secrets.token_hex(4)
        self.last = 0  # number of the newest message
        self.messages: deque[tuple[int, bytes]] = deque(maxlen=BUFFER)
        self.users = 0
        self.ready = asyncio.Event()
        self.closed = False
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pump: asyncio.Task[None] | None = None
        self.linger: asyncio.TimerHandle | None = None

    def cursor(self, number: int | None = None) -> str:
        return f"{self.epoch}:{self.last if number is None else number}"

    def position(self, cursor: str | None) -> tuple[int, bool]:
        """Where a client's cursor points: (number, reset). An unknown, foreign or too old cursor
        means "from now on", with reset=True so the client knows it may have missed messages."""
        if not cursor:
            return self.last, False
        epoch, _, number = cursor.partition(":")
        if epoch != self.epoch or not number.isdigit() or int(number) > self.last:
            return self.last, True
        n = int(number)
        oldest = self.messages[0][0] if self.messages else self.last + 1
        return n, n + 1 < oldest

    def after(self, number: int) -> list[tuple[int, bytes]]:
        if number >= self.last:
            return []
        return [(n, body) for n, body in self.messages if n > number]

    def _add(self, body: bytes) -> None:
        self.last += 1
        self.messages.append((self.last, body))
        self._wake()

    def _wake(self) -> None:
        # One future shared by every waiter: a message wakes each of them once, costing no
        # bookkeeping per client.
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    async def wait_after(self, number: int, timeout_s: float) -> None:
        """Return once a message newer than ``number`` exists, the channel closes, or time runs out."""
        if self.last > number or self.closed or timeout_s <= 0:
            return
        await asyncio.wait((self._changed,), timeout=timeout_s)


class ChannelHub:
    """The channels of one gateway on one event loop."""

    def __init__(self, app: Offload, linger_s: float = LINGER_S) -> None:
        self._app = app
        self._linger_s = linger_s
        self._channels: dict[str, Channel] = {}

    @asynccontextmanager
    async def join(self, name: str) -> AsyncIterator[Channel]:
        """Use a channel; once entered it is subscribed, so nothing published after is missed."""
        channel = self._channels.get(name)
        if channel is None or channel.closed:
            channel = self._channels[name] = Channel(name)
            channel.pump = asyncio.get_running_loop().create_task(self._pump(channel))
            # Its error is logged by the pump and raised to joiners; never "never retrieved".
            channel.pump.add_done_callback(lambda t: t.cancelled() or t.exception())
        pump = channel.pump
        channel.users += 1
        if channel.linger is not None:
            channel.linger.cancel()
            channel.linger = None
        try:
            if not channel.ready.is_set() and pump is not None:
                ready = asyncio.ensure_future(channel.ready.wait())
                try:
                    await asyncio.wait((ready, pump), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ready.cancel()
                if not channel.ready.is_set():
                    pump.result()  # the reason the subscription failed
            yield channel
        finally:
            channel.users -= 1
            if channel.users == 0 and not channel.closed:
                channel.linger = asyncio.get_running_loop().call_later(self._linger_s, self._drop_if_idle, channel)

    def _drop_if_idle(self, channel: Channel) -> None:
        channel.linger = None
        if channel.users == 0 and channel.pump is not None:
            channel.pump.cancel()

    async def _pump(self, channel: Channel) -> None:
        try:
            store = await self._app._store()
            async with store.subscribe(channel.name) as raw_messages:
                channel.ready.set()
                async for raw in raw_messages:
                    try:
                        value = self._app.codec.loads(raw)
                    except Exception as e:
                        log.warning("dropped an undecodable message on channel %r: %s", channel.name, e)
                        continue
                    channel._add(dumps(to_plain(value)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("subscription to channel %r ended: %s", channel.name, e)
            raise
        finally:
            channel.closed = True
            channel._wake()
            if self._channels.get(channel.name) is channel:
                del self._channels[channel.name]

    async def close(self) -> None:
        pumps = [c.pump for c in self._channels.values() if c.pump is not None]
        for channel in list(self._channels.values()):
            if channel.linger is not None:
                channel.linger.cancel()
        for pump in pumps:
            pump.cancel()
        if pumps:
            await asyncio.wait(pumps)
