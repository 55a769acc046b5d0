"""Answers about tasks: ``GET /tasks/{id}`` (with ``?wait=`` long polling), ``GET /wait`` and
``GET /tasks/{id}/events`` (Server-Sent Events).

A waiting request is one coroutine asleep on `Store.watch`: no thread, no poll loop. It enters
the watch before its first read, so a change between the read and the sleep still wakes it,
and it re-reads only when signalled (or every ``recheck_s``, so a lost signal costs latency,
never an answer); a final state that comes with its signal (`Watch.final_state`) is not read
again. Each response object is built by an endpoint that has already checked the
parameters and tokens; it does its own I/O inside ``__call__``, where it can see the client
leave.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

from starlette.types import Receive, Scope, Send

from offload.brokers.base import Watch
from offload.gateway.gateway import Gateway
from offload.gateway.payload import Rendered, dumps
from offload.gateway.sse import ClientGone, Interrupted, Stream, encode_event, send_json

log = logging.getLogger("offload.gateway")

#: The event id of a task stream's last event. EventSource reconnects when a stream ends;
#: coming back with this id it is told 204, which makes it stop for good.
DONE_ID = "done"

Ready = Callable[[list[Rendered]], bool]


def etag(rendered: Rendered) -> dict[str, str]:
    return {"etag": f'"{rendered.version}"'}


def unknown(task_ids: Sequence[str], states: Sequence[Rendered | None]) -> bytes:
    missing = next(i for i, s in zip(task_ids, states, strict=True) if s is None)
    return dumps({"detail": f"unknown task id {missing!r} (never enqueued here, or its result expired)"})


class Waiting:
    """Read tasks, and wait for them to be ``ready`` for at most ``wait_s``."""

    def __init__(self, gateway: Gateway, task_ids: Sequence[str], ready: Ready, wait_s: float) -> None:
        self.gateway = gateway
        self.task_ids = list(task_ids)
        self.ready = ready
        self.wait_s = wait_s
        self.waited = False

    async def run(self) -> list[Rendered | None]:
        gw = self.gateway
        deadline = time.monotonic() + self.wait_s
        async with AsyncExitStack() as stack:
            watch = None
            if self.wait_s > 0:
                store = await gw.app._store()
                watch = await stack.enter_async_context(store.watch(self.task_ids))
            while True:
                states = await gw.reader.read(self.task_ids)
                if any(s is None for s in states):
                    return states
                done = [s for s in states if s is not None]
                left = deadline - time.monotonic()
                if watch is None or left <= 0 or self.ready(done):
                    return states
                if not self.waited:
                    self.waited = True
                    gw.metrics.waiting.labels("poll").inc()
                    stack.callback(gw.metrics.waiting.labels("poll").dec)
                await watch.wait(min(left, gw.recheck_s))
                finals = watch.final_states(self.task_ids)
                if finals is not None:  # each came with its signal: the answer, without a read
                    known = [gw.reader.rendered(i, raw) for i, raw in zip(self.task_ids, finals, strict=True)]
                    if self.ready(known):
                        return list[Rendered | None](known)


class LongPoll:
    """The answer to ``GET /tasks/{id}`` (one id) or ``GET /wait`` (several)."""

    def __init__(self, gateway: Gateway, task_ids: Sequence[str], ready: Ready, wait_s: float, *, many: bool) -> None:
        self.waiting = Waiting(gateway, task_ids, ready, wait_s)
        self.many = many

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.waiting.gateway
        started = time.monotonic()
        try:
            if self.waiting.wait_s > 0:
                states = await gw.wait(receive, self.waiting.run())
            else:  # answered at once: no need to watch for the client leaving
                states = await self.waiting.run()
        except ClientGone:
            gw.metrics.wait_seconds.labels("gone").observe(time.monotonic() - started)
            return
        except Interrupted:
            # The server is going away: answer with the state as it is; the client asks again.
            self.waiting.wait_s = 0
            states = await self.waiting.run()
        if any(s is None for s in states):
            await send_json(send, 404, unknown(self.waiting.task_ids, states))
            return
        found = [s for s in states if s is not None]
        complete = self.waiting.ready(found)
        if self.waiting.waited:
            gw.metrics.wait_seconds.labels("ready" if complete else "timeout").observe(time.monotonic() - started)
        note_served(gw, found, live=self.waiting.waited)
        if self.many:
            body = b'{"done":%s,"tasks":[%s]}' % (b"true" if complete else b"false", b",".join(s.body for s in found))
            await send_json(send, 200, body)
        else:
            await send_json(send, 200, found[0].body, etag(found[0]))


def note_served(gw: Gateway, states: Sequence[Rendered], *, live: bool) -> None:
    """Count what clients were sent; for a client that waited, how long after its task's end."""
    now = dt.datetime.now(dt.UTC)
    for s in states:
        gw.metrics.states_served.labels(s.state.status.value).inc()
        if live and s.done and s.state.finished_at is not None:
            gw.metrics.delivery_lag.observe(max((now - s.state.finished_at).total_seconds(), 0.0))


class TaskEvents:
    """``GET /tasks/{id}/events``: a ``state`` event per change, then ``done``.

    Each event's id is the version of the state it carries. A client that reconnects with
    ``Last-Event-ID`` is sent the current state only if it differs from the one it has, so
    it misses no change that matters and never the final one: the final state comes as a
    ``state`` event and again as ``done``, whose id (`DONE_ID`) ends the stream for good.
    """

    def __init__(self, gateway: Gateway, task_id: str, last_id: str | None) -> None:
        self.gateway = gateway
        self.task_id = task_id
        self.last_id = last_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.serve_stream(
            receive, send, lambda stream: self._run(stream, send), f"task stream {self.task_id}"
        )

    async def _run(self, stream: Stream, send: Send) -> None:
        gw = self.gateway
        store = await gw.app._store()
        async with store.watch([self.task_id]) as watch:
            [current] = await gw.reader.read([self.task_id])
            if current is None:
                await send_json(send, 404, unknown([self.task_id], [None]))
                return
            # The first state event follows at once, unless the client already has it.
            await stream.start(flush=current.version == self.last_id and not current.done)
            gw.metrics.waiting.labels("stream").inc()
            try:
                await self._follow(stream, watch, current)
            finally:
                gw.metrics.waiting.labels("stream").dec()

    async def _follow(self, stream: Stream, watch: Watch, current: Rendered | None) -> None:
        gw = self.gateway
        sent = self.last_id
        live = False
        while True:
            if current is None:  # the result expired while we followed it
                await stream.end()
                return
            if current.done:
                # The final state (unless the client has it) and done, in the last write.
                final = b"" if current.version == sent else encode_event(current.body, event="state", event_id=current.version)
                note_served(gw, [current], live=live)
                await stream.end(final + encode_event(current.body, event="done", event_id=DONE_ID))
                return
            if current.version != sent:
                await stream.event(current.body, event="state", event_id=current.version)
                note_served(gw, [current], live=live)
                sent = current.version
            # Quiet until the next keep-alive: a change wakes us; otherwise the keep-alive goes
            # out and the state is re-read anyway, in case a signal was lost.
            changed = await watch.wait(stream.until_keepalive())
            if not changed:
                await stream.keepalive_if_due()
            live = True
            came = watch.final_state(self.task_id)
            [current] = [gw.reader.rendered(self.task_id, came)] if came is not None else await gw.reader.read([self.task_id])
