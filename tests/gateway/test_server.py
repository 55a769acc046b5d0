"""The gateway as users run it: ``offload gateway`` (uvicorn) in its own process, real worker
processes running the tasks, and HTTP clients over real sockets."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload import Offload
from offload.tokens import make_token
from tests.conftest import urls_for
from tests.gateway.conftest import SECRET, Server, data, parse_block, start_gateway
from tests.support import OffloadProcess, flush_namespace, start_worker

BASIC = "tests.apps.basic."


@dataclass
class Site:
    """One namespace on one kind: the test's app, a gateway process, worker processes."""

    url: str
    results: str | None
    namespace: str
    secret: str | None = None
    app: Offload = field(init=False)
    processes: list[OffloadProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Offload(self.url, namespace=self.namespace, results=self.results, secret=self.secret)

    async def gateway(self) -> Server:
        server = await asyncio.to_thread(start_gateway, self.url, self.namespace, self.results, secret=self.secret)
        self.processes.append(server)
        return server

    async def worker(self, *args: str) -> OffloadProcess:
        extra = {"OFFLOAD_TEST_SECRET": self.secret} if self.secret else None
        worker = await asyncio.to_thread(start_worker, self.url, self.namespace, *args, results=self.results, extra_env=extra)
        self.processes.append(worker)
        return worker

    async def send(self, name: str, *args: Any, queue: str | None = None) -> str:
        ref = self.app.ref(BASIC + name)
        if queue is not None:
            ref = ref.options(queue=queue)  # type: ignore[assignment]
        return (await ref.adelay(*args)).id


@pytest.fixture
async def site(server_kind: str, tmp_path: Path, namespace: str) -> AsyncIterator[Site]:
    url, results = urls_for(server_kind, tmp_path)
    made = Site(url, results, namespace)
    yield made
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in made.processes))
    try:
        await (await made.app._store()).flush_namespace()
        await (await made.app._broker()).flush_namespace()
    except NotImplementedError:
        pass
    await made.app.aclose()


async def waiting_clients(client: httpx.AsyncClient, kind: str, count: int, timeout: float = 15) -> None:
    """Until the gateway reports ``count`` clients of a kind waiting. Polled from /metrics: the
    gateway is another process, and its gauge is the only sign that a request is waiting."""
    pattern = re.compile(rf'^offload_gateway_waiting_clients{{kind="{kind}"}} (\S+)$', re.M)
    seen: float | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                found = pattern.search((await client.get("/metrics")).text)
                seen = float(found.group(1)) if found else None
                if seen == count:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"the gateway reported {seen} waiting {kind} client(s), not {count}, for {timeout} s") from None


class EventReader:
    """Reads SSE events off a streaming httpx response, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_text()
        self._buffer = ""

    async def block(self, timeout: float = 20) -> str:
        async with asyncio.timeout(timeout):
            while "\n\n" not in self._buffer:
                self._buffer += await anext(self._chunks)
        block, _, self._buffer = self._buffer.partition("\n\n")
        return block

    async def rest(self, timeout: float = 20) -> str:
        """Everything until the server ends the response."""
        async with asyncio.timeout(timeout):
            async for chunk in self._chunks:
                self._buffer += chunk
        rest, self._buffer = self._buffer, ""
        return rest

    async def event(self, timeout: float = 20) -> dict[str, str]:
        while True:
            parsed = parse_block(await self.block(timeout))
            if "data" in parsed:
                return parsed


def client_of(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base, timeout=httpx.Timeout(60))


async def test_long_polls_answer_when_real_tasks_end(site: Site) -> None:
    gateway = await site.gateway()
    fast = await site.send("progress_steps", 3, 0.05)
    slow = await site.send("add", 20, 22, queue="later")  # nobody consumes "later" yet
    async with client_of(gateway) as client:
        one = asyncio.create_task(client.get(f"/tasks/{fast}", params={"wait": 30}))
        any_ = asyncio.create_task(client.get("/wait", params={"ids": f"{fast},{slow}", "mode": "any", "wait": 30}))
        all_ = asyncio.create_task(client.get("/wait", params={"ids": f"{fast},{slow}", "mode": "all", "wait": 30}))
        await waiting_clients(client, "poll", 3)

        # When a worker runs the fast task, the long poll and the "any" wait answer.
        await site.worker()
        answer = (await asyncio.wait_for(one, 30)).json()
        assert (answer["status"], answer["result"], answer["progress"]) == ("succeeded", 3, 1.0)
        body = (await asyncio.wait_for(any_, 30)).json()
        assert body["done"] is True
        assert [t["status"] for t in body["tasks"]] == ["succeeded", "queued"]
        assert not all_.done()

        # "all" answers once the slow one ran too.
        await site.worker("-q", "later")
        body = (await asyncio.wait_for(all_, 30)).json()
        assert body["done"] is True
        assert [(t["status"], t["result"]) for t in body["tasks"]] == [("succeeded", 3), ("succeeded", 42)]
        await waiting_clients(client, "poll", 0)

        # A long poll that runs out of time answers with the current state.
        pending = await site.send("add", 1, 1, queue="nobody")
        timed_out = await client.get(f"/tasks/{pending}", params={"wait": 0.5})
        assert timed_out.json()["status"] == "queued"


async def test_stream_shows_progress_then_done(site: Site) -> None:
    gateway = await site.gateway()
    await site.worker()
    # Steps far enough apart that a busy machine still shows several of them.
    task_id = await site.send("progress_steps", 5, 0.3)
    async with client_of(gateway) as client, client.stream("GET", f"/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["x-accel-buffering"] == "no"
        reader = EventReader(response)
        events = [await reader.event()]
        while events[-1]["event"] != "done":
            events.append(await reader.event())
    states = [data(e) for e in events if e["event"] == "state"]
    progress = [s["progress"] for s in states if s["progress"] is not None]
    assert len(progress) >= 2, states  # progress arrived while the task ran
    assert progress == sorted(progress)
    assert states[-1]["status"] == "succeeded" and states[-1]["result"] == 5
    assert data(events[-1]) == states[-1]
    assert any(s["message"] and s["message"].startswith("step ") for s in states)


async def test_stream_resumes_with_last_event_id(site: Site) -> None:
    gateway = await site.gateway()
    await site.worker()
    task_id = await site.send("progress_steps", 4, 0.5)
    async with client_of(gateway) as client:
        # Given a client that saw some progress, then lost its connection,
        async with client.stream("GET", f"/tasks/{task_id}/events") as response:
            reader = EventReader(response)
            seen = await reader.event()
            while data(seen)["progress"] is None:
                seen = await reader.event()
        assert data(seen)["status"] != "succeeded"
        # when it comes back after the task ended, it gets the final state and done;
        await site.app.result(task_id).wait(timeout=30)
        response = await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": seen["id"]})
        events = [parse_block(b) for b in response.text.split("\n\n")]
        events = [e for e in events if "data" in e]
        assert [(e["event"], data(e)["status"]) for e in events] == [("state", "succeeded"), ("done", "succeeded")]
        # with the final state's id it gets done alone, and after done, 204: stop.
        again = await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": events[0]["id"]})
        assert [parse_block(b).get("event") for b in again.text.split("\n\n") if "data" in b] == ["done"]
        assert (await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": "done"})).status_code == 204


async def test_channels_reach_streams_and_long_polls(site: Site) -> None:
    gateway = await site.gateway()
    await site.worker()
    async with client_of(gateway) as client, client.stream("GET", "/channels/exports/events") as response:
        reader = EventReader(response)
        assert (await reader.block()).startswith("retry:")  # subscribed
        poll = asyncio.create_task(client.get("/channels/exports", params={"wait": 30}))
        await waiting_clients(client, "channel", 2)
        await site.send("publish_to", "exports", "row 1")
        event = await reader.event()
        assert data(event) == {"data": "row 1"}
        body = (await asyncio.wait_for(poll, 30)).json()
        assert body["messages"] == [{"data": "row 1"}]
        await site.send("publish_to", "exports", "row 2")
        assert data(await reader.event()) == {"data": "row 2"}
        # The next poll, with the cursor it was given, gets what came in between.
        body = (await client.get("/channels/exports", params={"wait": 30, "cursor": body["cursor"]})).json()
        assert body["messages"] == [{"data": "row 2"}]


async def test_tokens_health_and_metrics(server_kind: str, tmp_path: Path, namespace: str) -> None:
    url, results = urls_for(server_kind, tmp_path)
    site = Site(url, results, namespace, secret=SECRET)
    try:
        gateway = await site.gateway()
        await site.worker()
        task_id = await site.send("add", 2, 3)
        await site.app.result(task_id).wait(timeout=30)
        async with client_of(gateway) as client:
            assert (await client.get(f"/tasks/{task_id}")).status_code == 403
            token = make_token(site.app, task_id)
            body = (await client.get(f"/tasks/{task_id}", params={"token": token, "wait": 5})).json()
            assert (body["status"], body["result"]) == ("succeeded", 5)
            assert (await client.get("/health")).json() == {"status": "ok"}
            metrics = (await client.get("/metrics")).text
            assert 'offload_gateway_states_served_total{status="succeeded"} 1.0' in metrics
            assert "offload_broker_up 1.0" in metrics
            script = await client.get("/offload.js")
            assert script.status_code == 200 and "subscribe" in script.text
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in site.processes))
        await flush_namespace(site.app)
        await site.app.aclose()


@pytest.mark.parametrize("server_kind", ["sqlite"], indirect=True)
async def test_shutdown_answers_long_polls_and_ends_streams(site: Site) -> None:
    gateway = await site.gateway()
    task_id = await site.send("add", 1, 2)  # no worker: it stays queued
    async with client_of(gateway) as client, client.stream("GET", f"/tasks/{task_id}/events") as response:
        reader = EventReader(response)
        assert data(await reader.event())["status"] == "queued"
        poll = asyncio.create_task(client.get(f"/tasks/{task_id}", params={"wait": 60}))
        await waiting_clients(client, "poll", 1)
        gateway.proc.send_signal(signal.SIGTERM)
        # The long poll is answered with the current state, the stream ends cleanly, and the
        # server exits well before the minute the long poll could have waited.
        assert (await asyncio.wait_for(poll, 10)).json()["status"] == "queued"
        assert "data:" not in await reader.rest(timeout=10)
    # uvicorn re-raises the signal once it has shut down, as a process killed by it would end.
    assert await asyncio.to_thread(gateway.proc.wait, 10) in (0, -signal.SIGTERM)
    assert "Traceback" not in gateway.output

