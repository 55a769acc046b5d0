"""The gateway as Django views under a prefix: the same answers, tokens and streams as the
gateway itself, through Django's async test client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from django.test import AsyncClient

from offload import Offload
from tests.django.testapp.tasks import add
from tests.support import OffloadProcess

PREFIX = "/jobs/offload"


@pytest.fixture
async def app() -> AsyncIterator[Offload]:
    from offload.contrib.django import app

    yield app
    await app.aclose()  # this test's loop goes away: close its connections


async def test_a_task_needs_its_token_and_unknown_ids_are_404(app: Offload, worker: OffloadProcess) -> None:
    client = AsyncClient()
    r = await add.adelay(1, 2)
    assert (await client.get(f"{PREFIX}/tasks/{r.id}")).status_code == 403
    assert (await client.get(f"{PREFIX}/tasks/{r.id}?token=1.bad")).status_code == 403
    other = await add.adelay(0, 0)
    assert (await client.get(f"{PREFIX}/tasks/{r.id}?token={other.token()}")).status_code == 403
    unknown = "x" * 22
    assert (await client.get(f"{PREFIX}/tasks/{unknown}?token={app.result(unknown).token()}")).status_code == 404

    answer = await client.get(f"{PREFIX}/tasks/{r.id}?token={r.token()}&wait=20")
    assert answer.status_code == 200
    assert answer.json() == {"id": r.id, "status": "succeeded", "progress": None, "message": None, "result": 3, "error": None}
    assert answer.headers["cache-control"] == "no-store"


async def test_a_long_poll_answers_with_the_current_state_after_wait(app: Offload) -> None:
    client = AsyncClient()
    r = await add.options(countdown=3600).adelay(1, 1)  # never due during the test
    answer = await client.get(f"{PREFIX}/tasks/{r.id}?token={r.token()}&wait=0.3")
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    await r.acancel()


async def test_events_stream_until_the_task_ends(app: Offload, worker: OffloadProcess) -> None:
    client = AsyncClient()
    r = await add.adelay(2, 2)
    answer = await client.get(f"{PREFIX}/tasks/{r.id}/events?token={r.token()}")
    assert answer.status_code == 200
    assert answer["content-type"].startswith("text/event-stream")
    # A task that ended already may come as one body; a live one streams.
    if answer.streaming:
        body = b"".join([chunk async for chunk in answer.streaming_content]).decode()
    else:
        body = answer.content.decode()
    events = [block for block in body.split("\n\n") if "data: " in block]
    assert events[-1].startswith("id: done\nevent: done\n")
    assert json.loads(events[-1].rpartition("data: ")[2])["result"] == 4


async def test_wait_for_several_and_the_script(app: Offload, worker: OffloadProcess) -> None:
    client = AsyncClient()
    a, b = await add.adelay(1, 0), await add.adelay(2, 0)
    answer = await client.get(f"{PREFIX}/wait?ids={a.id},{b.id}&token={a.token()},{b.token()}&mode=all&wait=20")
    assert answer.status_code == 200
    assert answer.json()["done"] is True
    assert [t["result"] for t in answer.json()["tasks"]] == [1, 2]
    script = await client.get(f"{PREFIX}/offload.js")
    assert script.status_code == 200
    assert script["content-type"].startswith("text/javascript")
    assert b"function result(taskId, options)" in script.content
