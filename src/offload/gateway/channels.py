"""Answers about pub/sub channels: ``GET /channels/{name}/events`` (Server-Sent Events, one
``message`` event per message) and ``GET /channels/{name}?cursor=&wait=`` (long polling, for
browsers without EventSource). Both read the gateway's shared subscription (`hub`)."""

from __future__ import annotations

import logging
import time

from starlette.types import Receive, Scope, Send

from offload.gateway.gateway import Gateway
from offload.gateway.hub import Channel
from offload.gateway.sse import ClientGone, Interrupted, Stream, send_json

log = logging.getLogger("offload.gateway")


class ChannelEvents:
    def __init__(self, gateway: Gateway, name: str, last_id: str | None) -> None:
        self.gateway = gateway
        self.name = name
        self.last_id = last_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.serve_stream(receive, send, self._run, f"channel stream {self.name!r}")

    async def _run(self, stream: Stream) -> None:
        gw = self.gateway
        async with gw.hub.join(self.name) as channel:
            # Headers go out only once subscribed: a client that has them (EventSource's
            # "open") misses nothing published from then on.
            await stream.start()
            gw.metrics.waiting.labels("channel").inc()
            try:
                await self._follow(stream, channel)
            finally:
                gw.metrics.waiting.labels("channel").dec()

    async def _follow(self, stream: Stream, channel: Channel) -> None:
        position, _ = channel.position(self.last_id)
        while True:
            for number, body in channel.after(position):
                await stream.event(body, event_id=channel.cursor(number))
                position = number
            if channel.closed:
                # The subscription failed: end, and EventSource comes back for a new one.
                await stream.end()
                return
            await channel.wait_after(position, stream.until_keepalive())
            if channel.last <= position and not channel.closed:
                await stream.keepalive_if_due()


class ChannelPoll:
    """``{"cursor": ..., "messages": [...], "reset": bool}``: the messages after ``cursor``,
    waiting up to ``wait_s`` for the first one. Send ``cursor`` back with the next poll."""

    def __init__(self, gateway: Gateway, name: str, cursor: str | None, wait_s: float) -> None:
        self.gateway = gateway
        self.name = name
        self.cursor = cursor
        self.wait_s = wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self.gateway.wait(receive, self._answer())
        except ClientGone:
            return
        except Interrupted:
            self.wait_s = 0
            body = await self._answer()
        await send_json(send, 200, body)

    async def _answer(self) -> bytes:
        gw = self.gateway
        async with gw.hub.join(self.name) as channel:
            position, reset = channel.position(self.cursor)
            if channel.last <= position and self.wait_s > 0:
                gw.metrics.waiting.labels("channel").inc()
                try:
                    deadline = time.monotonic() + self.wait_s
                    while channel.last <= position and not channel.closed and time.monotonic() < deadline:
                        await channel.wait_after(position, deadline - time.monotonic())
                finally:
                    gw.metrics.waiting.labels("channel").dec()
            found = channel.after(position)
            last = found[-1][0] if found else position
            return b'{"cursor":"%s","messages":[%s],"reset":%s}' % (
                channel.cursor(last).encode(), b",".join(body for _, body in found), b"true" if reset else b"false",
            )
