"""Server-Sent Events on plain ASGI, and the client-disconnect race every waiting response runs.

A stream is a `Stream`: it sends the headers once, then events and keep-alive comments. The
headers ask proxies not to buffer (``X-Accel-Buffering: no`` for nginx, ``no-transform``
for the rest) and not to cache; comments every ``keepalive_s`` keep idle streams from being cut
by proxies and load balancers that close quiet connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from starlette.types import Message, Receive, Scope, Send

T = TypeVar("T")

#: Tells EventSource how soon to reconnect after the stream drops (milliseconds).
RETRY_MS = 2000

SSE_HEADERS: Mapping[str, str] = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-store, no-transform",
    "x-accel-buffering": "no",
}


_RAW_SSE_HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Interrupted(Exception):
    """The server is shutting down: answer now with what there is."""


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T], active: set[asyncio.Future[Any]]) -> T:
    """Run ``work`` until it ends or the client disconnects (then raise `ClientGone`).

    A waiting request must notice a client that left: otherwise an abandoned long poll or
    stream would hold its watch, its memory and its place in the metrics until it timed out.
    While it runs, ``work`` is in ``active``, where a draining server cancels it: that is
    raised as `Interrupted`.
    """
    worker: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    active.add(worker)
    try:
        await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Reached on cancellation from outside too: neither child may outlive this request.
        active.discard(worker)
        gone = watcher.done()
        if not gone:
            watcher.cancel()
        if not worker.done():
            worker.cancel()
            # Let it unwind (leave its watch, update the metrics) before the request ends.
            await asyncio.wait((worker,))
    if worker.cancelled():
        raise ClientGone if gone else Interrupted
    return worker.result()


def encode_event(data: bytes | None = None, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event. ``data`` must not contain newlines (compact JSON never does)."""
    lines = []
    if event_id is not None:
        lines.append(b"id: " + event_id.encode())
    if event is not None:
        lines.append(b"event: " + event.encode())
    if data is not None:
        lines.append(b"data: " + data)
    return b"\n".join(lines) + b"\n\n"


class Stream:
    """The sending side of one SSE response."""

    def __init__(self, send: Send, keepalive_s: float) -> None:
        self._send = send
        self.keepalive_s = keepalive_s
        self._last_write = time.monotonic()
        self.started = False
        self._prefix = b""

    async def start(self, *, flush: bool = True) -> None:
        """Send the headers. With ``flush``, also the ``retry`` line, so the client sees the
        stream open now; otherwise it goes out with the first event (one write less)."""
        await self._send({"type": "http.response.start", "status": 200, "headers": _RAW_SSE_HEADERS})
        self.started = True
        self._prefix = b"retry: %d\n\n" % RETRY_MS
        if flush:
            await self.write(b"")

    async def write(self, chunk: bytes, *, last: bool = False) -> None:
        if self._prefix:
            chunk, self._prefix = self._prefix + chunk, b""
        await self._send({"type": "http.response.body", "body": chunk, "more_body": not last})
        self._last_write = time.monotonic()

    async def event(self, data: bytes | None = None, *, event: str | None = None, event_id: str | None = None) -> None:
        await self.write(encode_event(data, event=event, event_id=event_id))

    def until_keepalive(self) -> float:
        """Seconds until the stream has been quiet for ``keepalive_s``."""
        return max(self._last_write + self.keepalive_s - time.monotonic(), 0.0)

    async def keepalive_if_due(self) -> None:
        if self.until_keepalive() <= 0:
            await self.write(b": keep-alive\n\n")

    async def end(self, chunk: bytes = b"") -> None:
        """End the response, with ``chunk`` as its last bytes."""
        await self.write(chunk, last=True)


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """A complete JSON response, for the answers sent from inside a waiting response."""
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def last_event_id(scope: Scope, query: Mapping[str, Any]) -> str | None:
    """``Last-Event-ID`` from the header EventSource sends on reconnect, or from ``?lastEventId=``
    (what EventSource polyfills use, as they cannot always set headers)."""
    for key, value in scope.get("headers", ()):
        if key == b"last-event-id":
            return str(value.decode("latin-1")) or None
    found = query.get("lastEventId")
    return str(found) if found else None
