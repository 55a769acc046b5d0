"""The gateway's Django views under a real ASGI server (uvicorn): waiting browsers hold no
thread, and one that leaves lets go of its wait at once."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import psutil
import pytest

from offload import Offload
from tests.django.conftest import django_env
from tests.django.testapp.tasks import add
from tests.support import ROOT, OffloadProcess

pytestmark = pytest.mark.slow

PREFIX = "/jobs/offload"
_PORT = re.compile(r"Uvicorn running on https?://[^:]+:(\d+)")


class Uvicorn(OffloadProcess):
    def __init__(self) -> None:
        self.args = ["uvicorn"]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.django.asgi:application", "--port", "0",
             "--timeout-graceful-shutdown", "1"],
            cwd=ROOT, env=django_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        match = _PORT.search(self.wait_for(lambda line: _PORT.search(line) is not None, timeout=30))
        assert match is not None
        self.base = f"http://127.0.0.1:{match.group(1)}"


@pytest.fixture(scope="module")
def server() -> Iterator[Uvicorn]:
    process = Uvicorn()
    yield process
    process.stop()


@pytest.fixture
async def app() -> AsyncIterator[Offload]:
    from offload.contrib.django import app

    yield app
    await app.aclose()


async def waiting(client: httpx.AsyncClient, kind: str) -> float:
    text = (await client.get(f"{PREFIX}/metrics")).text
    match = re.search(rf'offload_gateway_waiting_clients{{kind="{kind}"}} ([0-9.]+)', text)
    assert match is not None, text
    return float(match.group(1))


async def until_waiting(client: httpx.AsyncClient, kind: str, count: int, timeout: float = 20) -> None:
    """The server's own count of waiting clients, read from its metrics until it says ``count``."""
    deadline = time.monotonic() + timeout
    while (seen := await waiting(client, kind)) != count:
        assert time.monotonic() < deadline, f"{seen} {kind} clients waiting, expected {count}"
        await asyncio.sleep(0.05)


async def test_long_polls_hold_no_thread(server: Uvicorn, app: Offload) -> None:
    polls = 40
    r = await add.options(countdown=3600).adelay(1, 1)  # stays queued until cancelled
    limits = httpx.Limits(max_connections=polls + 5)
    async with httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits) as client:
        url = f"{PREFIX}/tasks/{r.id}?token={r.token()}&wait=45"
        answers = [asyncio.ensure_future(client.get(url)) for _ in range(polls)]
        await until_waiting(client, "poll", polls)
        threads = psutil.Process(server.proc.pid).num_threads()
        print(f"{polls} long polls waiting on {threads} server threads")
        assert threads < polls / 2, f"{threads} threads for {polls} waiting long polls"
        await r.acancel()  # the task ends: every poll answers at once
        done = await asyncio.wait_for(asyncio.gather(*answers), 20)
    assert {a.status_code for a in done} == {200}
    assert {a.json()["status"] for a in done} == {"cancelled"}


async def test_a_stream_whose_client_leaves_is_let_go(server: Uvicorn, app: Offload) -> None:
    r = await add.options(countdown=3600).adelay(2, 2)
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        async with client.stream("GET", f"{PREFIX}/tasks/{r.id}/events?token={r.token()}") as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            while "event: state" not in await anext(lines):
                pass
            await until_waiting(client, "stream", 1)
        # The client hung up: Django cancels the view, the gateway's stream ends.
        await until_waiting(client, "stream", 0)
    await r.acancel()
