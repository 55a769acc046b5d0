"""The dashboard's routes, mounted by the gateway at ``/dashboard``: the page, its two static
files, a JSON API the page reads, two actions, and a stream of Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import math
from importlib import resources
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from offload import admin
from offload.app import Offload
from offload.dashboard import views
from offload.dashboard.access import DashboardAccess
from offload.gateway.app import checked_task_id
from offload.gateway.gateway import Gateway
from offload.gateway.payload import dumps
from offload.gateway.sse import Stream

#: Seconds between two overviews on the live stream (a task's page is re-read every second).
OVERVIEW_EVERY_S = 2.0
TASK_EVERY_S = 1.0
MAX_PAGE = 500
MAX_ACTION_IDS = 1000
_STATIC_TYPES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
_NO_STORE = {"cache-control": "no-store"}


def _static(name: str) -> bytes:
    return resources.files("offload.dashboard").joinpath("static", name).read_bytes()


def dashboard_routes(app: Offload, gw: Gateway, password: str | None) -> list[BaseRoute]:
    """The routes under ``/dashboard`` (paths relative to it)."""
    access = DashboardAccess(password)
    page = _static("index.html").replace(b"__CSRF_TOKEN__", access.csrf_token.encode())
    static = {name: _static(name) for name in _STATIC_TYPES}

    def guarded(endpoint: Any) -> Any:
        async def checked(request: Request) -> Any:
            access.check(request)
            return await endpoint(request)
        return checked

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={
            **_NO_STORE, "x-frame-options": "DENY", "referrer-policy": "no-referrer",
            "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        })

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return Response(static[name], media_type=_STATIC_TYPES[name], headers={"cache-control": "no-cache"})

    async def overview(request: Request) -> Response:
        return _json(await views.overview(app))

    async def task_list(request: Request) -> Response:
        q = request.query_params
        limit = _limit(q.get("limit"), 50, MAX_PAGE)
        before = q.get("before")
        try:
            found = await views.tasks(app, q.get("status") or None, q.get("name") or None, q.get("queue") or None,
                                      limit, None if not before else _number(before, "before", 0))
        except ValueError as e:  # an unknown status, said in one line by the history query
            raise HTTPException(400, str(e)) from None
        return _json(found)

    async def task_detail(request: Request) -> Response:
        found = await views.task(app, checked_task_id(request.path_params["task_id"]))
        if found is None:
            raise HTTPException(404, "no such task (unknown, or its state has expired)")
        return _json(found)

    async def workers(request: Request) -> Response:
        return _json({"workers": [w.to_json() for w in await app.aworkers()]})

    async def dead(request: Request) -> Response:
        return _json(await views.dead(app, _limit(request.query_params.get("limit"), 100, MAX_ACTION_IDS)))

    async def replay(request: Request) -> Response:
        access.check_action(request)
        return _json({"replayed": await admin.replay(app, await _chosen(request))})

    async def purge(request: Request) -> Response:
        access.check_action(request)
        return _json({"purged": await admin.purge_dead(app, await _chosen(request))})

    async def periodic(request: Request) -> Response:
        return _json(views.periodic(app))

    async def events(request: Request) -> ASGIApp:
        task_id = request.query_params.get("task")
        return _LiveStream(app, gw, None if not task_id else checked_task_id(task_id))

    return [
        Route("/", guarded(index), methods=["GET"]),
        Route("/static/{name}", guarded(static_file), methods=["GET"]),
        Route("/api/overview", guarded(overview), methods=["GET"]),
        Route("/api/tasks", guarded(task_list), methods=["GET"]),
        Route("/api/tasks/{task_id}", guarded(task_detail), methods=["GET"]),
        Route("/api/workers", guarded(workers), methods=["GET"]),
        Route("/api/dead", guarded(dead), methods=["GET"]),
        Route("/api/dead/replay", guarded(replay), methods=["POST"]),
        Route("/api/dead/purge", guarded(purge), methods=["POST"]),
        Route("/api/periodic", guarded(periodic), methods=["GET"]),
        Route("/api/events", guarded(events), methods=["GET"]),
    ]


class _LiveStream:
    """``event: overview`` every `OVERVIEW_EVERY_S`; with a task, ``event: task`` when its
    page would change. Served by the gateway's own SSE machinery, so a draining gateway ends
    it and EventSource reconnects to the next one."""

    def __init__(self, app: Offload, gw: Gateway, task_id: str | None) -> None:
        self.app, self.gw, self.task_id = app, gw, task_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gw.serve_stream(receive, send, self._run, "dashboard stream")

    async def _run(self, stream: Stream) -> None:
        await stream.start()
        sent_task: bytes | None = None
        next_overview = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= next_overview:
                await stream.event(dumps(await views.overview(self.app)), event="overview")
                next_overview = loop.time() + OVERVIEW_EVERY_S
            if self.task_id is not None:
                found = await views.task(self.app, self.task_id)
                data = dumps(found) if found is not None else b"null"
                if data != sent_task:
                    await stream.event(data, event="task")
                    sent_task = data
            await asyncio.sleep(TASK_EVERY_S if self.task_id is not None else OVERVIEW_EVERY_S)


async def _chosen(request: Request) -> list[str] | None:
    """The dead letters an action names: ``{"ids": [...]}``, or ``{"all": true}`` (None)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if isinstance(body, dict) and body.get("all") is True and "ids" not in body:
        return None
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids or len(ids) > MAX_ACTION_IDS or not all(isinstance(i, str) for i in ids):
        raise HTTPException(400, f'the body must be {{"ids": [1 to {MAX_ACTION_IDS} ids]}} or {{"all": true}}')
    return [checked_task_id(i) for i in ids]


def _json(content: Any) -> Response:
    try:
        body = dumps(content)
    except TypeError:  # a result a JSON codec would not have stored (pickle, msgpack): its repr
        body = json.dumps(content, default=repr, separators=(",", ":")).encode()
    return Response(body, media_type="application/json", headers=_NO_STORE)


def _limit(raw: str | None, default: int, top: int) -> int:
    limit = _number(raw, "limit", default)
    if limit != int(limit) or not 1 <= limit <= top:
        raise HTTPException(400, f"limit must be a whole number from 1 to {top}")
    return int(limit)


def _number(raw: str | None, name: str, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise HTTPException(400, f"{name} must be a finite number")
    return value
