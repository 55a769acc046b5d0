"""Fixtures for the gateway tests: an app per kind with helpers to move its tasks along, an
in-process client, a harness for streaming responses, and real gateway servers."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload import Offload, Status
from offload.result import TaskState
from tests.conftest import require_server, urls_for
from tests.support import ROOT, OffloadProcess, env_for

SECRET = "gateway-test-secret"


# -- apps whose tasks the test moves along by writing their states --------------------------
async def set_state(app: Offload, task_id: str, status: Status, **changes: Any) -> TaskState:
    """Write a new state for a task, as a worker would (and wake its watchers the same way)."""
    state = await app._read_state(task_id)
    assert state is not None, task_id
    state.status = status
    now = dt.datetime.now(dt.UTC)
    if status is Status.STARTED and state.started_at is None:
        state.started_at = now
    if status.done:
        state.finished_at = now
    for key, value in changes.items():
        setattr(state, key, value)
    await app._write_states([state])
    return state


@pytest.fixture
async def make_app(kind: str, tmp_path: Path, namespace: str) -> AsyncIterator[Any]:
    """``make_app(**options)`` builds apps on the kind's URL; everything is flushed after."""
    url, results = urls_for(kind, tmp_path)
    made: list[Offload] = []

    def make(**options: Any) -> Offload:
        options.setdefault("namespace", namespace)
        app = Offload(url, results=results, **options)
        made.append(app)
        return app

    yield make
    for app in made:
        try:
            await (await app._store()).flush_namespace()
            await (await app._broker()).flush_namespace()
        except NotImplementedError:
            pass
        await app.aclose()


@pytest.fixture
def app(make_app: Any) -> Offload:
    return make_app()  # type: ignore[no-any-return]


def client_for(asgi: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(asgi, **kwargs), base_url="http://gateway")


# -- a raw ASGI harness, for responses that stream ------------------------------------------
@dataclass
class Call:
    """One request to an ASGI app, run as a task, with its response readable as it is sent
    (httpx's ASGITransport collects a whole response first, which a stream never ends)."""

    status: asyncio.Future[int]
    headers: dict[str, str] = field(default_factory=dict)
    chunks: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    _buffer: bytes = b""

    def disconnect(self) -> None:
        self.gone.set()

    async def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        """Everything up to and including ``marker``."""
        async with asyncio.timeout(timeout):
            while marker not in self._buffer:
                self._buffer += await self.chunks.get()
        head, _, self._buffer = self._buffer.partition(marker)
        return head + marker

    async def events(self, count: int, timeout: float = 10) -> list[dict[str, str]]:
        """The next ``count`` SSE events (comments and retry-only blocks skipped)."""
        out: list[dict[str, str]] = []
        while len(out) < count:
            block = (await self.read_until(b"\n\n", timeout)).decode()
            event = parse_block(block)
            if "data" in event:
                out.append(event)
        return out

    async def finish(self, timeout: float = 10) -> bytes:
        """Wait for the response to end; the rest of its body."""
        assert self.task is not None
        async with asyncio.timeout(timeout):
            await asyncio.shield(self.task)
        while not self.chunks.empty():
            self._buffer += self.chunks.get_nowait()
        rest, self._buffer = self._buffer, b""
        return rest


def parse_block(block: str) -> dict[str, str]:
    event: dict[str, str] = {}
    for line in block.strip("\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        event[key] = value
    return event


def start_call(asgi: Any, path: str, query: str = "", headers: Mapping[str, str] | None = None, root_path: str = "") -> Call:
    loop = asyncio.get_running_loop()
    call = Call(status=loop.create_future())
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(), "root_path": root_path,
        "query_string": query.encode(), "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("gateway", 80), "client": ("127.0.0.1", 1234),
    }
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await call.gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            call.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            call.status.set_result(message["status"])
        elif message["type"] == "http.response.body":
            if message.get("body"):
                call.chunks.put_nowait(message["body"])
            if not message.get("more_body", False):
                call.ended = True

    call.task = loop.create_task(asgi(scope, receive, send))
    return call


async def until(predicate: Any, timeout: float = 10) -> None:
    """Wait for an in-process condition that the code under test makes true without telling us
    (a client counted as waiting: a gauge, with nothing to wait on): poll it until it holds, or
    fail at the deadline saying which condition it was."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.001)
    except TimeoutError:
        try:
            condition = inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            condition = repr(predicate)
        raise AssertionError(f"not true within {timeout} s: {condition}") from None


def waiting(asgi: Any, kind: str) -> float:
    return asgi.state.gateway.metrics.waiting.labels(kind)._value.get()  # type: ignore[no-any-return]


# -- real servers ----------------------------------------------------------------------------
SERVER_KINDS = ["sqlite", "redis", "amqp"]


@pytest.fixture(params=SERVER_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The kinds a gateway process and worker processes can share (not memory://)."""
    require_server(request.param)
    return request.param  # type: ignore[no-any-return]


_PORT = re.compile(r"Uvicorn running on https?://[^:]+:(\d+)")


class Server(OffloadProcess):
    """A uvicorn server process on a free port (chosen by the kernel, read from its log line)."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.args = command
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [sys.executable, *command], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(lambda line: _PORT.search(line) is not None, timeout=30)
        match = _PORT.search(line)
        assert match is not None
        self.base = f"http://127.0.0.1:{match.group(1)}"


def start_gateway(url: str, namespace: str, results: str | None = None, app: str = "tests.apps.basic:app",
                  secret: str | None = None) -> Server:
    """``python -m offload gateway APP --port 0``: the command users run."""
    extra = {"OFFLOAD_TEST_SECRET": secret} if secret else {}
    return Server(["-m", "offload", "gateway", app, "--port", "0"], env_for(url, namespace, results, **extra))


@pytest.fixture
def servers() -> Iterator[list[OffloadProcess]]:
    """Processes to stop after the test, whatever happens."""
    started: list[OffloadProcess] = []
    yield started
    for process in started:
        process.stop()


def sse_events(text: str) -> list[dict[str, str]]:
    return [e for e in (parse_block(b) for b in text.split("\n\n")) if "data" in e]


def data(event: Mapping[str, str]) -> Any:
    return json.loads(event["data"])
