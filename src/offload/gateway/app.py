"""The gateway's Starlette application: routes, parameters, access checks and errors.

Every path is relative to where the app is mounted (Starlette strips ``root_path``), so the
gateway works at ``/`` under ``offload gateway`` and under any prefix inside another site.
Endpoints only parse and check: the waiting happens in the response objects of `tasks` and
`channels`, which can see the client leave.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from offload.app import Offload
from offload.brokers.base import QueueStats
from offload.channels import RESERVED_CHANNEL_PREFIX
from offload.errors import BrokerError, ConfigError
from offload.gateway.channels import ChannelEvents, ChannelPoll
from offload.gateway.gateway import MAX_IDS, MAX_WAIT_S, Gateway
from offload.gateway.payload import Rendered, dumps
from offload.gateway.sse import last_event_id
from offload.gateway.tasks import DONE_ID, LongPoll, TaskEvents

log = logging.getLogger("offload.gateway")

#: A health check that takes longer than this reports the broker unreachable.
HEALTH_TIMEOUT_S = 5.0
_MAX_ID_LENGTH = 200


def create_gateway(
    app: Offload,
    *,
    cors_origins: Sequence[str] | None = None,
    debug: bool | None = None,
    keepalive_s: float = 15.0,
    recheck_s: float = 15.0,
    public_channels: Sequence[str] = (),
    metrics: bool = True,
    metrics_token: str | None = None,
    dashboard: bool = False,
    dashboard_password: str | None = None,
) -> Starlette:
    """The gateway of ``app`` as an ASGI application (what ``app.asgi(...)`` returns).

    ``cors_origins``: origins allowed to call it from other sites (none by default).
    ``debug``: send tracebacks of failed tasks and of gateway errors (default: ``app.debug``).
    ``keepalive_s``: idle seconds before a stream gets a keep-alive comment.
    ``recheck_s``: how often a waiting long poll re-reads its tasks without a change signal.
    ``public_channels``: channel name patterns anyone may follow when the app has a secret.
    ``metrics``: serve ``GET /metrics`` (it names the queues and counts their tasks).
    ``metrics_token``: when given, ``/metrics`` answers 401 without ``Authorization: Bearer <it>``.
    ``dashboard``: serve the dashboard at ``/dashboard/``, behind basic auth as ``admin`` with
    ``dashboard_password``; without a password, to loopback clients only.
    """
    if metrics_token is not None and not metrics_token:
        raise ConfigError("metrics_token must not be empty (pass None to serve /metrics without one)")
    expected_authorization = f"Bearer {metrics_token}".encode() if metrics_token else None
    gw = Gateway(
        app, debug=app.debug if debug is None else debug, keepalive_s=keepalive_s, recheck_s=recheck_s,
        public_channels=tuple(public_channels),
    )
    script = resources.files("offload.gateway").joinpath("static/offload.js").read_bytes()

    async def task(request: Request) -> ASGIApp:
        task_id = checked_task_id(request.path_params["task_id"])
        _require(gw.may_read([task_id], _tokens(request)))
        wait_s = _wait(request)
        since = request.query_params.get("since")

        def ready(states: list[Rendered]) -> bool:
            return states[0].done or (since is not None and states[0].version != since)

        return LongPoll(gw, [task_id], ready, wait_s, many=False)

    async def task_events(request: Request) -> ASGIApp:
        task_id = checked_task_id(request.path_params["task_id"])
        _require(gw.may_read([task_id], _tokens(request)))
        last_id = last_event_id(request.scope, request.query_params)
        if last_id == DONE_ID:
            # The client saw the end; 204 is how SSE tells EventSource not to reconnect.
            return Response(status_code=204)
        return TaskEvents(gw, task_id, last_id)

    async def wait_many(request: Request) -> ASGIApp:
        raw_ids = [i for i in request.query_params.get("ids", "").split(",") if i]
        task_ids = list(dict.fromkeys(raw_ids))
        if not task_ids:
            raise HTTPException(400, "ids= must name at least one task id (comma-separated)")
        if len(task_ids) > MAX_IDS:
            raise HTTPException(400, f"ids= may name at most {MAX_IDS} tasks")
        for task_id in task_ids:
            checked_task_id(task_id)
        # Tokens come in the order of the ids as given (duplicates included).
        tokens = _tokens(request)
        by_id = dict(zip(raw_ids, tokens, strict=True)) if len(tokens) == len(raw_ids) else {}
        _require(gw.may_read(task_ids, [by_id.get(i, "") for i in task_ids]))
        mode = request.query_params.get("mode", "all")
        if mode not in ("any", "all"):
            raise HTTPException(400, f"mode must be 'any' or 'all', got {mode!r}")
        wait_s = _wait(request)

        def ready(states: list[Rendered]) -> bool:
            ended = sum(1 for s in states if s.done)
            return ended == len(states) or (mode == "any" and ended > 0)

        return LongPoll(gw, task_ids, ready, wait_s, many=True)

    async def channel_events(request: Request) -> ASGIApp:
        name = _channel(request.path_params["name"])
        _require(gw.may_follow(name, request.query_params.get("token")))
        return ChannelEvents(gw, name, last_event_id(request.scope, request.query_params))

    async def channel_poll(request: Request) -> ASGIApp:
        name = _channel(request.path_params["name"])
        _require(gw.may_follow(name, request.query_params.get("token")))
        return ChannelPoll(gw, name, request.query_params.get("cursor"), _wait(request))

    async def offload_js(request: Request) -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers={"cache-control": "public, max-age=300"})

    async def health(request: Request) -> Response:
        try:
            await asyncio.wait_for(_probe(app), HEALTH_TIMEOUT_S)
        except Exception as e:
            log.warning("health check failed: %s", str(e) or type(e).__name__)
            gw.metrics.broker.up = False
            detail = {"detail": str(e) or type(e).__name__} if gw.debug else {}
            return _json(503, {"status": "unavailable", **detail})
        gw.metrics.broker.up = True
        return _json(200, {"status": "ok"})

    async def prometheus(request: Request) -> Response:
        if expected_authorization is not None:
            given = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, expected_authorization):
                return _json(401, {"detail": "/metrics needs Authorization: Bearer <the metrics token>"},
                             {"www-authenticate": 'Bearer realm="metrics"'})
        try:
            # One stats call and one registry read, side by side, per scrape.
            stats, workers = await asyncio.wait_for(asyncio.gather(_stats(app), app.aworkers()), HEALTH_TIMEOUT_S)
            gw.metrics.broker.update(stats, workers)
            gw.metrics.broker.up = True
        except Exception as e:
            log.warning("metrics: broker stats or worker registry unavailable: %s", str(e) or type(e).__name__)
            gw.metrics.broker.up = False
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json(exc.status_code, {"detail": exc.detail}, exc.headers)

    async def broker_error(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _json(503, {"detail": str(exc) if gw.debug else "the task broker is unavailable"})

    async def server_error(request: Request, exc: Exception) -> Response:
        # Only reached without debug (Starlette shows its traceback page in debug): the
        # browser learns that something failed, the log learns what.
        return _json(500, {"detail": "internal error"})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await gw.close()

    routes: list[BaseRoute] = [
        # The stream routes come first: "/tasks/{id}" would not match them anyway, but the
        # order states the intent.
        Route("/tasks/{task_id}/events", task_events, methods=["GET"]),
        Route("/tasks/{task_id}", task, methods=["GET"]),
        Route("/wait", wait_many, methods=["GET"]),
        Route("/channels/{name}/events", channel_events, methods=["GET"]),
        Route("/channels/{name}", channel_poll, methods=["GET"]),
        Route("/offload.js", offload_js, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if metrics:
        routes.append(Route("/metrics", prometheus, methods=["GET"]))
    if dashboard:
        from offload.dashboard import dashboard_routes

        routes.append(Mount("/dashboard", routes=dashboard_routes(app, gw, dashboard_password)))
    elif dashboard_password is not None:
        raise ConfigError("dashboard_password is set but the dashboard is off: pass dashboard=True")
    middleware = []
    if cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET"],
            allow_headers=["Last-Event-ID", "Cache-Control"], expose_headers=["ETag"], max_age=600,
        ))
    starlette = Starlette(
        debug=gw.debug, routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={HTTPException: http_error, BrokerError: broker_error, Exception: server_error},
    )
    starlette.state.gateway = gw
    return starlette


async def _probe(app: Offload) -> None:
    backends = await app._backends()
    await backends.broker.stats()
    await backends.store.get_states(["health-check"])


async def _stats(app: Offload) -> QueueStats:
    return await (await app._broker()).stats()


def _json(status: int, content: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(content), status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store", **(headers or {})})


def checked_task_id(task_id: str) -> str:
    """A task id from a URL, or a 400 for one that cannot be one (empty, or over 200 characters)."""
    if not task_id or len(task_id) > _MAX_ID_LENGTH:
        raise HTTPException(400, "not a task id")
    return task_id


def _channel(name: str) -> str:
    # offload's own channels (worker control) do not exist for browsers, whatever the token
    # or the public_channels patterns say.
    if name.startswith(RESERVED_CHANNEL_PREFIX):
        raise HTTPException(404, f"no channel {name!r}: names starting with {RESERVED_CHANNEL_PREFIX!r} are reserved")
    return name


def _tokens(request: Request) -> list[str]:
    # ?token=a,b or ?token=a&token=b (tokens never hold commas).
    return [t for value in request.query_params.getlist("token") for t in value.split(",") if t]


def _require(allowed: bool) -> None:
    if not allowed:
        raise HTTPException(403, "a valid token is required: ?token=... (r.token() in Python)")


def _wait(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        raise HTTPException(400, f"wait must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(seconds):
        raise HTTPException(400, f"wait must be a number of seconds, got {raw!r}")
    return min(max(seconds, 0.0), MAX_WAIT_S)
