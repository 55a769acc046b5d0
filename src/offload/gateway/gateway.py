"""`Gateway`: the options of one gateway and what its requests share (per event loop)."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Receive, Send

from offload.app import Offload
from offload.gateway.hub import ChannelHub
from offload.gateway.metrics import GatewayMetrics
from offload.gateway.reader import StateReader
from offload.gateway.sse import ClientGone, Interrupted, Stream, send_json, unless_disconnected
from offload.tokens import check_channel_token, check_token

#: The longest a long poll may wait, whatever ``?wait=`` asks (API.md).
MAX_WAIT_S = 60.0
#: Ids one ``GET /wait`` may name.
MAX_IDS = 100

T = TypeVar("T")
log = logging.getLogger("offload.gateway")


@dataclass(slots=True)
class _PerLoop:
    reader: StateReader
    hub: ChannelHub
    #: The work of every waiting request (long polls and streams), for `Gateway.drain`.
    active: set[asyncio.Future[Any]] = field(default_factory=set)


@dataclass(eq=False)
class Gateway:
    app: Offload
    debug: bool = False
    #: Idle seconds before a stream gets a keep-alive comment (and its task is re-read).
    keepalive_s: float = 15.0
    #: A waiting long poll re-reads its tasks this often even without a change signal, so a
    #: lost notification costs latency, never an answer. Far apart: the signal is the rule.
    recheck_s: float = 15.0
    #: Channels anyone may follow even when the app has a secret (fnmatch patterns).
    public_channels: tuple[str, ...] = ()
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PerLoop] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def _here(self) -> _PerLoop:
        # Readers and hubs hold futures of one loop; a gateway object served from two loops
        # (tests, or an app run twice) gets one set per loop.
        loop = asyncio.get_running_loop()
        found = self._loops.get(loop)
        if found is None:
            found = self._loops[loop] = _PerLoop(StateReader(self.app, self.debug), ChannelHub(self.app))
        return found

    @property
    def reader(self) -> StateReader:
        return self._here().reader

    @property
    def hub(self) -> ChannelHub:
        return self._here().hub

    async def wait(self, receive: Receive, work: Awaitable[T]) -> T:
        """Run a waiting request's work: `ClientGone` if the client leaves, `Interrupted` if
        the server drains."""
        return await unless_disconnected(receive, work, self._here().active)

    async def serve_stream(self, receive: Receive, send: Send, run: Callable[[Stream], Awaitable[None]], what: str) -> None:
        """Serve one Server-Sent Events stream written by ``run``, whatever ends it: the client
        leaving (nothing to do), the server draining (end the stream, so EventSource reconnects
        elsewhere with Last-Event-ID and misses nothing), or an error (a proper error response
        while nothing was sent yet, else a clean end)."""
        stream = Stream(send, self.keepalive_s)
        try:
            await self.wait(receive, run(stream))
        except ClientGone:
            return
        except Interrupted:
            if stream.started:
                await stream.end()
            else:
                await send_json(send, 503, b'{"detail":"the gateway is restarting"}', {"retry-after": "1"})
        except Exception:
            if not stream.started:
                raise
            log.exception("%s broke off", what)
            try:
                await stream.end()
            except Exception:
                pass

    def drain(self) -> None:
        """Shutting down: long polls answer now with the current state and streams end (their
        clients reconnect, to another instance). Streams never end by themselves, so without
        this a server would wait for them until its shutdown deadline and then cut them."""
        found = self._loops.get(asyncio.get_running_loop())
        if found is not None:
            for work in list(found.active):
                work.cancel()

    # -- access --------------------------------------------------------------------------------
    @property
    def guarded(self) -> bool:
        """With a secret, every task and channel needs a token."""
        return self.app.secret is not None

    def may_read(self, task_ids: Sequence[str], tokens: Sequence[str]) -> bool:
        if not self.guarded:
            return True
        return len(tokens) == len(task_ids) and all(
            check_token(self.app, i, t) for i, t in zip(task_ids, tokens, strict=True)
        )

    def may_follow(self, channel: str, token: str | None) -> bool:
        if not self.guarded or any(fnmatch.fnmatchcase(channel, p) for p in self.public_channels):
            return True
        return check_channel_token(self.app, channel, token)

    async def close(self) -> None:
        """Stop this loop's channel subscriptions and close its connections (server shutdown)."""
        found = self._loops.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.hub.close()
        await self.app.aclose()
