"""The gateway's routes as Django views: each one hands its request to the gateway's own ASGI
application (`offload.gateway`) and relays the answer, so token checks, long polling,
Server-Sent Events, 404s and metrics are the gateway's, not a copy.

The views are async: under ASGI a long poll or a stream is a coroutine asleep on the result
store, holding no thread. When the client leaves, Django cancels the view (or the stream it
iterates), and the cancellation reaches the gateway's response, which lets go of its watch.
Under WSGI they work too, but each request then holds a thread while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from offload.contrib.django.conf import gateway_options, project_app
from offload.contrib.django.middleware import SKIP_ATTRIBUTE

log = logging.getLogger("offload.django")

_lock = threading.Lock()
_gateway: Any = None


def gateway_app() -> Any:
    """The project's gateway (one per process, built on first use)."""
    global _gateway
    with _lock:
        if _gateway is None:
            _gateway = project_app().asgi(**gateway_options())
        return _gateway


class _Exchange:
    """One ASGI request/response between a Django view and the gateway."""

    def __init__(self) -> None:
        self.start: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.body: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self._sent_request = False

    async def receive(self) -> dict[str, Any]:
        if not self._sent_request:
            self._sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # A disconnect is never reported from here: Django cancels the view instead, and
        # that cancellation stops the gateway's response.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start.set_result(message)
        elif message["type"] == "http.response.body":
            self.body.put_nowait((message.get("body", b""), bool(message.get("more_body", False))))


def _scope(request: HttpRequest, path: str) -> dict[str, Any]:
    host, _, port = request.get_host().partition(":")
    client = request.META.get("REMOTE_ADDR")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method or "GET", "scheme": request.scheme or "http", "root_path": "",
        "path": path, "raw_path": quote(path).encode(),
        "query_string": request.META.get("QUERY_STRING", "").encode("latin-1"),
        "headers": [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in request.headers.items()],
        "server": (host, int(port) if port.isdigit() else (443 if request.is_secure() else 80)),
        "client": (client, 0) if client else None,
    }


def _headers(start: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_key, raw_value in start.get("headers", ()):
        key, value = raw_key.decode("latin-1"), raw_value.decode("latin-1")
        if key == "content-length":
            continue  # Django sets its own
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _release_request_thread() -> None:
    """Let the thread Django gave this request go while it waits.

    Under ASGI, Django runs each request in a `ThreadSensitiveContext`: the first sync call
    made for it (a middleware's ``process_request``, the ``request_started`` signal) starts a
    thread that then idles until the request ends. For a long poll or a stream, that is one
    parked thread per waiting browser. Every sync call of this request is over by now, so
    the thread is shut down here; a sync call after the view (``process_response``) gets a
    new one, stopped with the context as usual. This reads asgiref's executor registry; if
    that ever changes shape, the thread simply stays, as without this function.
    """
    try:
        from asgiref.sync import SyncToAsync

        context = SyncToAsync.thread_sensitive_context.get(None)
        if context is None or getattr(context, "_executor", None) is not None:
            return  # none, or an executor its creator owns and may reuse
        executor = SyncToAsync.context_to_thread_executor.pop(context, None)
    except (ImportError, AttributeError, TypeError):
        return
    if executor is not None:
        executor.shutdown(wait=False)


async def forward(request: HttpRequest, path: str) -> HttpResponseBase:
    """Answer ``request`` with the gateway's answer to ``path`` (relative to the gateway)."""
    _release_request_thread()
    exchange = _Exchange()
    call = asyncio.ensure_future(gateway_app()(_scope(request, path), exchange.receive, exchange.send))
    try:
        await asyncio.wait((exchange.start, call), return_when=asyncio.FIRST_COMPLETED)
        if not exchange.start.done():
            call.result()  # the gateway failed before answering: raise its error here
            raise RuntimeError(f"the gateway sent no response for {path}")
        start = exchange.start.result()
        first, more = await exchange.body.get()
    except BaseException:
        await _stop(call)
        raise
    headers = _headers(start)
    if not more:
        await _stop(call)
        return HttpResponse(first, status=start["status"], headers=headers)
    response = StreamingHttpResponse(_stream(exchange, first, call), status=start["status"], headers=headers)
    return response


async def _stream(exchange: _Exchange, first: bytes, call: asyncio.Future[Any]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        while True:
            chunk, more = await exchange.body.get()
            if chunk:
                yield chunk
            if not more:
                return
    finally:
        await _stop(call)


async def _stop(call: asyncio.Future[Any]) -> None:
    if not call.done():
        call.cancel()
        await asyncio.wait((call,))
    elif not call.cancelled() and call.exception() is not None:
        # An error after the answer went out (a stream that broke off): the gateway logged
        # what it could; this keeps it from being reported as never retrieved.
        log.debug("gateway response ended with %r", call.exception())


def _view(path: Callable[..., str]) -> Callable[..., Awaitable[HttpResponseBase]]:
    async def view(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        return await forward(request, path(**kwargs))

    setattr(view, SKIP_ATTRIBUTE, True)
    return view


task = _view(lambda task_id: f"/tasks/{task_id}")
task_events = _view(lambda task_id: f"/tasks/{task_id}/events")
wait = _view(lambda: "/wait")
channel = _view(lambda name: f"/channels/{name}")
channel_events = _view(lambda name: f"/channels/{name}/events")
script = _view(lambda: "/offload.js")
health = _view(lambda: "/health")
metrics = _view(lambda: "/metrics")
