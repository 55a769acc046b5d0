"""The gateway's routes in process (httpx over ASGI), on every backend kind: answers, long
polls, streams, channels, tokens and every error case."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from offload import ConfigError, Offload, Status
from offload.gateway.tasks import DONE_ID
from offload.tokens import check_channel_token, check_token, make_channel_token, make_token
from tests.conftest import require_server
from tests.gateway.conftest import SECRET, client_for, data, set_state, sse_events, start_call, until, waiting
from tests.support import RedisServer

KEYS = {"id", "status", "progress", "message", "result", "error"}


async def enqueue(app: Offload, name: str = "tests.gateway.job") -> str:
    # By name: no worker runs in these tests; the test moves each task along itself.
    return (await app.asend(name)).id


# -- GET /tasks/{id} -----------------------------------------------------------------------------
async def test_task_json_has_exactly_the_api_keys(app: Offload) -> None:
    task_id = await enqueue(app)
    async with client_for(app.asgi()) as client:
        response = await client.get(f"/tasks/{task_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"id": task_id, "status": "queued", "progress": None, "message": None,
                               "result": None, "error": None}
    assert response.headers["etag"].startswith('"')


async def test_progress_and_json_safe_result(app: Offload) -> None:
    task_id = await enqueue(app)
    await set_state(app, task_id, Status.STARTED, progress=0.5, message="half way")
    gw = app.asgi()
    async with client_for(gw) as client:
        assert (await client.get(f"/tasks/{task_id}")).json() | {"id": None} == {
            "id": None, "status": "started", "progress": 0.5, "message": "half way", "result": None, "error": None,
        }
        when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
        uid = uuid.uuid4()
        value = {"when": when, "amount": Decimal("1.50"), "id": uid, "pair": (1, 2), "raw": b"\x00\x01"}
        await set_state(app, task_id, Status.SUCCEEDED, progress=1.0, result=value)
        body = (await client.get(f"/tasks/{task_id}")).json()
    assert body["status"] == "succeeded"
    assert body["result"] == {"when": "2024-05-01T12:00:00+00:00", "amount": "1.50", "id": str(uid),
                              "pair": [1, 2], "raw": "AAE="}


async def test_failed_task_error_without_traceback(app: Offload) -> None:
    task_id = await enqueue(app)
    error = {"type": "ValueError", "message": "bad input", "traceback": "Traceback (most recent call last):\n..."}
    await set_state(app, task_id, Status.FAILED, error=error)
    async with client_for(app.asgi()) as client:
        body = (await client.get(f"/tasks/{task_id}")).json()
    assert body["status"] == "failed"
    assert body["error"] == {"type": "ValueError", "message": "bad input"}
    assert body["result"] is None


async def test_traceback_only_in_debug(make_app: Any) -> None:
    app = make_app(debug=True)
    task_id = await enqueue(app)
    await set_state(app, task_id, Status.FAILED, error={"type": "KeyError", "message": "'x'", "traceback": "Traceback: here"})
    async with client_for(app.asgi()) as client:
        assert (await client.get(f"/tasks/{task_id}")).json()["error"]["traceback"] == "Traceback: here"
    async with client_for(app.asgi(debug=False)) as client:
        assert "traceback" not in (await client.get(f"/tasks/{task_id}")).json()["error"]


@pytest.mark.parametrize(("status", "error_type"), [(Status.CANCELLED, "TaskCancelled"), (Status.EXPIRED, "TaskExpired")])
async def test_cancelled_and_expired_carry_an_error(app: Offload, status: Status, error_type: str) -> None:
    task_id = await enqueue(app)
    await set_state(app, task_id, status)
    async with client_for(app.asgi()) as client:
        body = (await client.get(f"/tasks/{task_id}")).json()
    assert body["status"] == status.value
    assert body["error"]["type"] == error_type


async def test_unknown_id_is_404_at_once_even_when_waiting(app: Offload) -> None:
    async with client_for(app.asgi()) as client:
        for path in ("/tasks/nope?wait=60", "/tasks/nope", "/wait?ids=nope&wait=60", "/tasks/nope/events"):
            response = await asyncio.wait_for(client.get(path), 5)
            assert response.status_code == 404, path
            assert "unknown task id 'nope'" in response.json()["detail"]


async def test_results_of_another_namespace_are_never_served(make_app: Any) -> None:
    mine = make_app()
    other = make_app(namespace=f"other{uuid.uuid4().hex[:8]}")
    task_id = await enqueue(other)
    await set_state(other, task_id, Status.SUCCEEDED, result="secret data")
    async with client_for(mine.asgi()) as client:
        assert (await client.get(f"/tasks/{task_id}")).status_code == 404
        assert (await client.get(f"/wait?ids={task_id}")).status_code == 404
    async with client_for(other.asgi()) as client:
        assert (await client.get(f"/tasks/{task_id}")).json()["result"] == "secret data"


# -- long polling ----------------------------------------------------------------------------------
async def test_long_poll_answers_when_the_task_ends(app: Offload) -> None:
    task_id = await enqueue(app)
    gw = app.asgi()
    async with client_for(gw) as client:
        pending = asyncio.create_task(client.get(f"/tasks/{task_id}?wait=30"))
        await until(lambda: waiting(gw, "poll") == 1)
        # A change that does not end the task does not answer a plain long poll.
        await set_state(app, task_id, Status.STARTED, progress=0.3)
        await set_state(app, task_id, Status.SUCCEEDED, result=42)
        response = await asyncio.wait_for(pending, 10)
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == 42
    assert waiting(gw, "poll") == 0


@pytest.mark.parametrize("kind", ["redis"])
async def test_a_final_state_that_comes_with_its_signal_is_not_read_again(
    kind: str, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_server(kind)
    app = make_app()
    poll_id, stream_id = await enqueue(app), await enqueue(app)
    gw = app.asgi()
    reader = gw.state.gateway.reader
    reads: list[list[str]] = []
    read = reader.read

    async def counted_read(ids: list[str]) -> Any:
        reads.append(list(ids))
        return await read(ids)

    monkeypatch.setattr(reader, "read", counted_read)
    async with client_for(gw) as client:
        pending = asyncio.create_task(client.get(f"/tasks/{poll_id}?wait=30"))
        call = start_call(gw, f"/tasks/{stream_id}/events")
        [queued] = await call.events(1)
        await until(lambda: waiting(gw, "poll") == 1 and waiting(gw, "stream") == 1)
        assert reads == [[poll_id], [stream_id]]  # each request's first read
        await set_state(app, poll_id, Status.SUCCEEDED, result=42)
        await set_state(app, stream_id, Status.SUCCEEDED, result="ok")
        response = await asyncio.wait_for(pending, 10)
        final, done = await call.events(2)
        await call.finish()
    assert (response.json()["status"], response.json()["result"]) == ("succeeded", 42)
    assert (queued["event"], final["event"], done["event"], data(done)["result"]) == ("state", "state", "done", "ok")
    assert reads == [[poll_id], [stream_id]]  # the final states came with their signals


async def test_long_poll_times_out_with_the_current_state(app: Offload) -> None:
    task_id = await enqueue(app)
    async with client_for(app.asgi()) as client:
        started = time.monotonic()
        response = await client.get(f"/tasks/{task_id}?wait=0.3")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert response.json()["status"] == "queued"


async def test_long_poll_with_since_answers_on_any_change(app: Offload) -> None:
    task_id = await enqueue(app)
    gw = app.asgi()
    async with client_for(gw) as client:
        first = await client.get(f"/tasks/{task_id}")
        version = first.headers["etag"].strip('"')
        # A version the client does not have: answered at once.
        assert (await asyncio.wait_for(client.get(f"/tasks/{task_id}?wait=30&since=old"), 5)).json()["status"] == "queued"
        pending = asyncio.create_task(client.get(f"/tasks/{task_id}?wait=30&since={version}"))
        await until(lambda: waiting(gw, "poll") == 1)
        await set_state(app, task_id, Status.STARTED, progress=0.25, message="a quarter")
        response = await asyncio.wait_for(pending, 10)
    assert response.json()["progress"] == 0.25
    assert response.headers["etag"].strip('"') != version


@pytest.mark.parametrize("wait", ["abc", "nan", "inf"])
async def test_bad_wait_is_400(app: Offload, wait: str) -> None:
    task_id = await enqueue(app)
    async with client_for(app.asgi()) as client:
        response = await client.get(f"/tasks/{task_id}", params={"wait": wait})
    assert response.status_code == 400
    assert "wait" in response.json()["detail"]


def test_wait_is_capped_at_60_seconds() -> None:
    from starlette.requests import Request

    from offload.gateway.app import _wait

    def parsed(query: str) -> float:
        return _wait(Request({"type": "http", "query_string": query.encode(), "headers": []}))

    assert parsed("wait=3600") == 60.0
    assert parsed("wait=-5") == 0.0
    assert parsed("wait=2.5") == 2.5
    assert parsed("") == 0.0


async def test_client_leaving_a_long_poll_releases_it(app: Offload) -> None:
    task_id = await enqueue(app)
    gw = app.asgi()
    call = start_call(gw, f"/tasks/{task_id}", "wait=30")
    await until(lambda: waiting(gw, "poll") == 1)
    call.disconnect()
    await call.finish()
    assert waiting(gw, "poll") == 0
    assert not call.status.done()  # nothing was sent to a client that left


# -- GET /wait -----------------------------------------------------------------------------------
async def test_wait_all_answers_when_every_task_ended(app: Offload) -> None:
    a, b = await enqueue(app), await enqueue(app)
    gw = app.asgi()
    async with client_for(gw) as client:
        pending = asyncio.create_task(client.get(f"/wait?ids={a},{b}&mode=all&wait=30"))
        await until(lambda: waiting(gw, "poll") == 1)
        await set_state(app, a, Status.SUCCEEDED, result="a")
        await set_state(app, b, Status.FAILED, error={"type": "E", "message": "b failed"})
        body = (await asyncio.wait_for(pending, 10)).json()
    assert body["done"] is True
    assert [t["id"] for t in body["tasks"]] == [a, b]
    assert [t["status"] for t in body["tasks"]] == ["succeeded", "failed"]


async def test_wait_any_answers_when_one_task_ended(app: Offload) -> None:
    a, b = await enqueue(app), await enqueue(app)
    gw = app.asgi()
    async with client_for(gw) as client:
        pending = asyncio.create_task(client.get(f"/wait?ids={a},{b}&mode=any&wait=30"))
        await until(lambda: waiting(gw, "poll") == 1)
        await set_state(app, b, Status.SUCCEEDED, result="b")
        body = (await asyncio.wait_for(pending, 10)).json()
    assert body["done"] is True
    assert [t["status"] for t in body["tasks"]] == ["queued", "succeeded"]


async def test_wait_times_out_with_done_false(app: Offload) -> None:
    a, b = await enqueue(app), await enqueue(app)
    await set_state(app, a, Status.SUCCEEDED)
    async with client_for(app.asgi()) as client:
        body = (await client.get(f"/wait?ids={a},{b}&wait=0.2")).json()
    assert body["done"] is False
    assert [t["status"] for t in body["tasks"]] == ["succeeded", "queued"]


async def test_wait_rejects_bad_parameters(app: Offload) -> None:
    task_id = await enqueue(app)
    async with client_for(app.asgi()) as client:
        assert (await client.get("/wait")).status_code == 400
        assert (await client.get("/wait?ids=,")).status_code == 400
        assert (await client.get(f"/wait?ids={task_id}&mode=some")).status_code == 400
        many = ",".join(f"t{i}" for i in range(101))
        assert "at most 100" in (await client.get(f"/wait?ids={many}")).json()["detail"]
        assert (await client.get(f"/wait?ids={task_id},nope")).status_code == 404


# -- Server-Sent Events for a task -----------------------------------------------------------------
async def test_stream_of_an_ended_task_is_state_then_done(app: Offload) -> None:
    task_id = await enqueue(app)
    await set_state(app, task_id, Status.SUCCEEDED, result=[1, 2])
    async with client_for(app.asgi()) as client:
        response = await client.get(f"/tasks/{task_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["x-accel-buffering"] == "no"
    assert "no-cache" in response.headers["cache-control"]
    assert response.text.startswith("retry: ")
    events = sse_events(response.text)
    assert [e["event"] for e in events] == ["state", "done"]
    assert data(events[0]) == data(events[1])
    assert data(events[1])["result"] == [1, 2] and set(data(events[1])) == KEYS
    assert events[1]["id"] == DONE_ID
    assert events[0]["id"] == response.headers.get("etag", events[0]["id"]).strip('"')


async def test_stream_follows_each_change_with_keepalives(make_app: Any) -> None:
    app = make_app()
    task_id = await enqueue(app)
    gw = app.asgi(keepalive_s=0.05)
    call = start_call(gw, f"/tasks/{task_id}/events")
    assert await asyncio.wait_for(call.status, 10) == 200
    [queued] = await call.events(1)
    assert queued["event"] == "state" and data(queued)["status"] == "queued"
    assert waiting(gw, "stream") == 1
    # Idle: comments keep proxies from cutting the stream.
    await call.read_until(b": keep-alive\n\n")
    await set_state(app, task_id, Status.STARTED, progress=0.5, message="half")
    [half] = await call.events(1)
    assert (data(half)["progress"], data(half)["message"]) == (0.5, "half")
    await set_state(app, task_id, Status.SUCCEEDED, progress=1.0, result="ok")
    final, done = await call.events(2)
    assert (final["event"], done["event"]) == ("state", "done")
    assert data(done)["result"] == "ok"
    await call.finish()
    assert call.ended
    assert len({queued["id"], half["id"], final["id"]}) == 3
    assert waiting(gw, "stream") == 0


async def test_stream_resumes_from_last_event_id(app: Offload) -> None:
    task_id = await enqueue(app)
    await set_state(app, task_id, Status.STARTED, progress=0.5)
    gw = app.asgi()
    async with client_for(gw) as client:
        first = start_call(gw, f"/tasks/{task_id}/events")
        [half] = await first.events(1)
        first.disconnect()
        await first.finish()
        await set_state(app, task_id, Status.SUCCEEDED, result="r")
        # Coming back with the id of the state it has: the final state and done.
        again = await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": half["id"]})
        events = sse_events(again.text)
        assert [(e["event"], data(e)["status"]) for e in events] == [("state", "succeeded"), ("done", "succeeded")]
        # It had the final state but not done: done only, never the final state lost.
        final_id = events[0]["id"]
        events = sse_events((await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": final_id})).text)
        assert [e["event"] for e in events] == ["done"]
        # Polyfills that cannot send headers use ?lastEventId=.
        events = sse_events((await client.get(f"/tasks/{task_id}/events?lastEventId={final_id}")).text)
        assert [e["event"] for e in events] == ["done"]
        # It saw done: 204 tells EventSource to stop reconnecting.
        response = await client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": DONE_ID})
        assert response.status_code == 204


async def test_client_leaving_a_stream_releases_it(app: Offload) -> None:
    task_id = await enqueue(app)
    gw = app.asgi()
    call = start_call(gw, f"/tasks/{task_id}/events")
    await call.events(1)
    assert waiting(gw, "stream") == 1
    call.disconnect()
    await call.finish()
    assert waiting(gw, "stream") == 0


# -- channels ------------------------------------------------------------------------------------
async def test_channel_stream_delivers_published_messages(app: Offload) -> None:
    gw = app.asgi()
    call = start_call(gw, "/channels/news/events")
    assert await asyncio.wait_for(call.status, 10) == 200
    assert call.headers["x-accel-buffering"] == "no"
    await call.read_until(b"retry: 2000\n\n")  # subscribed: what is published now arrives
    await app.apublish("news", {"headline": "hello", "at": dt.date(2024, 1, 2)})
    await app.apublish("news", [1, 2, 3])
    first, second = await call.events(2)
    assert data(first) == {"headline": "hello", "at": "2024-01-02"}
    assert data(second) == [1, 2, 3]
    assert first["id"] != second["id"]
    call.disconnect()
    await call.finish()
    assert waiting(gw, "channel") == 0


async def test_channel_stream_resumes_from_last_event_id(app: Offload) -> None:
    gw = app.asgi()
    first = start_call(gw, "/channels/ticks/events")
    await first.read_until(b"retry: 2000\n\n")
    await app.apublish("ticks", 1)
    [one] = await first.events(1)
    # A second follower keeps the subscription (and its buffer) alive while the first is away.
    other = start_call(gw, "/channels/ticks/events")
    await other.read_until(b"retry: 2000\n\n")
    first.disconnect()
    await first.finish()
    await app.apublish("ticks", 2)
    await app.apublish("ticks", 3)
    await other.events(2)
    again = start_call(gw, "/channels/ticks/events", headers={"Last-Event-ID": one["id"]})
    assert [data(e) for e in await again.events(2)] == [2, 3]
    for call in (other, again):
        call.disconnect()
        await call.finish()


async def test_channel_long_poll_with_cursor(app: Offload) -> None:
    gw = app.asgi()
    async with client_for(gw) as client:
        pending = asyncio.create_task(client.get("/channels/jobs?wait=30"))
        await until(lambda: waiting(gw, "channel") == 1)
        await app.apublish("jobs", "first")
        body = (await asyncio.wait_for(pending, 10)).json()
        assert body["messages"] == ["first"] and body["reset"] is False
        # Published between two polls: kept for the next one.
        await app.apublish("jobs", "second")
        await until(lambda: gw.state.gateway.hub._channels["jobs"].last == 2)
        body = (await client.get("/channels/jobs", params={"cursor": body["cursor"], "wait": 30})).json()
        assert body["messages"] == ["second"]
        # A cursor from another subscription (a restarted gateway): from now on, and said so.
        body = (await client.get("/channels/jobs", params={"cursor": "feed:1", "wait": 0})).json()
        assert body == {"cursor": body["cursor"], "messages": [], "reset": True}


# -- tokens ------------------------------------------------------------------------------------
async def test_with_a_secret_tasks_need_their_token(make_app: Any) -> None:
    app = make_app(secret=SECRET)
    task_id, other_id = await enqueue(app), await enqueue(app)
    await set_state(app, task_id, Status.SUCCEEDED, result="mine")
    token = app.result(task_id).token()
    async with client_for(app.asgi()) as client:
        for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/events", f"/wait?ids={task_id}"):
            sep = "&" if "?" in path else "?"
            assert (await client.get(path)).status_code == 403, path
            assert (await client.get(f"{path}{sep}token=forged.abc")).status_code == 403, path
            assert (await client.get(f"{path}{sep}token={make_token(app, other_id)}")).status_code == 403, path
            assert (await client.get(f"{path}{sep}token={token}")).status_code == 200, path
        body = (await client.get(f"/tasks/{task_id}", params={"token": token})).json()
        assert body["result"] == "mine"
        # 403 before 404: without a token nobody learns which ids exist.
        assert (await client.get("/tasks/nope")).status_code == 403
        assert (await client.get("/tasks/nope", params={"token": make_token(app, "nope")})).status_code == 404
        detail = (await client.get(f"/tasks/{task_id}")).json()["detail"]
        assert "token" in detail


async def test_wait_needs_a_token_per_id(make_app: Any) -> None:
    app = make_app(secret=SECRET)
    a, b = await enqueue(app), await enqueue(app)
    ta, tb = make_token(app, a), make_token(app, b)
    async with client_for(app.asgi()) as client:
        assert (await client.get(f"/wait?ids={a},{b}&token={ta}")).status_code == 403
        assert (await client.get(f"/wait?ids={a},{b}&token={tb},{ta}")).status_code == 403
        assert (await client.get(f"/wait?ids={a},{b}&token={ta},{tb}")).status_code == 200
        assert (await client.get(f"/wait?ids={a},{b}&token={ta}&token={tb}")).status_code == 200


async def test_tokens_are_bound_to_namespace_and_expire(make_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(secret=SECRET)
    task_id = await enqueue(app)
    other_ns = make_app(secret=SECRET, namespace=f"other{uuid.uuid4().hex[:8]}")
    other_secret = make_app(secret="another secret")
    token = make_token(app, task_id)
    assert check_token(app, task_id, token)
    assert not check_token(other_ns, task_id, make_token(app, task_id))
    assert not check_token(app, task_id, make_token(other_ns, task_id))
    assert not check_token(app, task_id, make_token(other_secret, task_id))
    assert not check_token(app, task_id + "x", token)
    # A task token is not a channel token, even for a channel named like the task.
    assert not check_channel_token(app, task_id, token)
    for garbage in ("", "x", ".", "123.", "abc.def", "9" * 40 + ".x", token + "x", None):
        assert not check_token(app, task_id, garbage)
    short = make_token(app, task_id, expires_in=dt.timedelta(seconds=30))
    assert check_token(app, task_id, short)
    later = time.time() + 31
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: later)
        assert not check_token(app, task_id, short)
        assert check_token(app, task_id, token)  # the default lasts a day


def test_tokens_are_url_safe_and_need_a_secret() -> None:
    app = Offload("memory://", secret=b"\x00binary secret")
    token = make_token(app, "abc")
    assert all(c.isalnum() or c in "-_." for c in token)
    with pytest.raises(ConfigError, match="secret="):
        make_token(Offload("memory://"), "abc")
    with pytest.raises(ConfigError, match="secret="):
        Offload("memory://").result("abc").token()
    with pytest.raises(ConfigError, match="positive"):
        make_token(app, "abc", expires_in=0)
    assert not check_token(Offload("memory://"), "abc", token)


async def test_with_a_secret_channels_need_a_token_unless_public(make_app: Any) -> None:
    app = make_app(secret=SECRET)
    gw = app.asgi(public_channels=["public.*"])
    async with client_for(gw) as client:
        assert (await client.get("/channels/private?wait=0")).status_code == 403
        assert (await client.get("/channels/private/events")).status_code == 403
        assert (await client.get("/channels/private?wait=0", params={"token": make_token(app, "private")})).status_code == 403
        token = make_channel_token(app, "private")
        assert (await client.get("/channels/private?wait=0", params={"token": token})).status_code == 200
        assert (await client.get("/channels/public.news?wait=0")).status_code == 200


# -- the rest ------------------------------------------------------------------------------------
async def test_offload_js_is_served(app: Offload) -> None:
    async with client_for(app.asgi()) as client:
        response = await client.get("/offload.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert "offload" in response.text and "EventSource" in response.text


async def test_health_ok(app: Offload) -> None:
    async with client_for(app.asgi()) as client:
        response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_health_503_when_the_broker_is_unreachable() -> None:
    app = Offload("redis://127.0.0.1:9/0", namespace="unreachable")
    async with client_for(app.asgi()) as client:
        response = await asyncio.wait_for(client.get("/health"), 15)
        assert (response.status_code, response.json()) == (503, {"status": "unavailable"})
        # The other routes say so too, in one line, without the URL's secrets or a traceback.
        response = await asyncio.wait_for(client.get("/tasks/abc"), 15)
    assert response.status_code == 503
    assert response.json() == {"detail": "the task broker is unavailable"}


async def test_metrics(app: Offload) -> None:
    task_id = await enqueue(app)
    async with client_for(app.asgi()) as client:
        await client.get(f"/tasks/{task_id}")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'offload_gateway_states_served_total{status="queued"} 1.0' in text
    assert 'offload_queue_depth{queue="default"} 1.0' in text
    assert 'offload_gateway_waiting_clients{kind="poll"} 0.0' in text
    assert "offload_gateway_wait_seconds_bucket" in text
    assert "offload_broker_up 1.0" in text


async def test_each_gateway_has_its_own_registry(app: Offload) -> None:
    one, two = app.asgi(), app.asgi()
    assert one.state.gateway.metrics.registry is not two.state.gateway.metrics.registry


async def test_cors_is_off_unless_configured(app: Offload) -> None:
    task_id = await enqueue(app)
    origin = {"Origin": "https://shop.example"}
    async with client_for(app.asgi()) as client:
        response = await client.get(f"/tasks/{task_id}", headers=origin)
        assert "access-control-allow-origin" not in response.headers
    async with client_for(app.asgi(cors_origins=["https://shop.example"])) as client:
        response = await client.get(f"/tasks/{task_id}", headers=origin)
        assert response.headers["access-control-allow-origin"] == "https://shop.example"
        assert "etag" in response.headers["access-control-expose-headers"].lower()
        preflight = await client.options(f"/tasks/{task_id}", headers={
            **origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "last-event-id"})
        assert preflight.status_code == 200
        other = await client.get(f"/tasks/{task_id}", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_mounted_under_a_prefix(app: Offload) -> None:
    task_id = await enqueue(app)
    site = Starlette(routes=[Mount("/jobs", app=app.asgi())])
    async with client_for(site) as client:
        assert (await client.get(f"/jobs/tasks/{task_id}")).json()["id"] == task_id
        assert (await client.get("/jobs/offload.js")).status_code == 200
        assert (await client.get(f"/tasks/{task_id}")).status_code == 404
        await set_state(app, task_id, Status.SUCCEEDED)
        events = sse_events((await client.get(f"/jobs/tasks/{task_id}/events")).text)
        assert [e["event"] for e in events] == ["state", "done"]
    # The same under a server's root_path (uvicorn --root-path behind a proxy).
    async with client_for(app.asgi(), root_path="/api") as client:
        assert (await client.get(f"/api/tasks/{task_id}")).json()["id"] == task_id


async def test_no_traceback_reaches_the_browser(app: Offload) -> None:
    task_id = await enqueue(app)
    store = await app._store()
    await store.put_states([(task_id, b"\x00 not a state")], 60)
    async with client_for(app.asgi(), raise_app_exceptions=False) as client:
        response = await client.get(f"/tasks/{task_id}")
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error"}
        assert "Traceback" not in response.text
        assert (await client.get(f"/tasks/{task_id}/events")).status_code == 500
        assert (await client.get(f"/tasks/{task_id}?wait=10")).status_code == 500
    async with client_for(app.asgi(debug=True), raise_app_exceptions=False) as client:
        assert "Traceback" in (await client.get(f"/tasks/{task_id}", headers={"Accept": "text/html"})).text


@pytest.mark.slow
async def test_a_store_that_goes_down_is_503(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    """The store's server dies while the gateway serves: every kind of read answers 503 in one
    line once the store's client gives up reconnecting (seconds: never a hang, never a traceback)."""
    server = RedisServer()
    server.start()
    app = Offload(server.url, namespace=namespace)
    try:
        task_id = await enqueue(app)
        paths = [f"/tasks/{task_id}", f"/tasks/{task_id}?wait=10", f"/tasks/{task_id}/events", f"/wait?ids={task_id}"]
        async with client_for(app.asgi()) as client:
            assert (await client.get(paths[0])).json()["status"] == "queued"  # connected and serving
            server.kill()
            async with asyncio.timeout(20):  # the store's client retries for about 5.5 s
                responses = await asyncio.gather(*(client.get(path) for path in paths))
        for path, response in zip(paths, responses, strict=True):
            assert (response.status_code, response.text) == (503, '{"detail":"the task broker is unavailable"}'), path
        # The log learns what failed: one warning per request, naming the server, no traceback.
        logged = [r for r in caplog.records if r.name == "offload.gateway"]
        assert sorted(r.getMessage().split(": ", 1)[0] for r in logged) == sorted(f"GET {p.split('?')[0]}" for p in paths)
        assert all(f"broker unavailable at {server.url}" in r.getMessage() and r.exc_info is None for r in logged)
    finally:
        server.kill()
        await app.aclose()


async def test_unknown_route_and_method(app: Offload) -> None:
    async with client_for(app.asgi()) as client:
        assert (await client.get("/nowhere")).json() == {"detail": "Not Found"}
        assert (await client.post("/tasks/abc")).status_code == 405


async def test_a_read_goes_out_at_once_and_reads_asked_meanwhile_go_together(
    app: Offload, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = [await enqueue(app) for _ in range(3)]
    store = await app._store()
    calls: list[list[str]] = []
    gate = asyncio.Event()
    original = store.get_states

    async def gated(task_ids: Any) -> Any:
        calls.append(list(task_ids))
        if len(calls) == 1:
            await gate.wait()  # the first fetch stays out until the test lets it back
        return await original(task_ids)

    monkeypatch.setattr(store, "get_states", gated)
    gw = app.asgi()
    reader = gw.state.gateway.reader
    alone = asyncio.create_task(reader.read([first]))
    # Sent within a few turns of the loop, no time passing: a lone read does not wait for
    # company. sleep(0) counts turns here, it waits for nothing: the count is what is asserted.
    for _ in range(20):
        if calls:
            break
        await asyncio.sleep(0)
    assert calls == [[first]]
    later = [asyncio.create_task(reader.read([i])) for i in (second, third)]
    await until(lambda: len(reader._waiting) == 2)  # both asked for, queued behind the first fetch
    # Not sent while the first fetch is out, however long it takes: time passing is the point
    # of this sleep (a timer-driven batcher sent them after a millisecond).
    await asyncio.sleep(0.05)
    assert calls == [[first]]
    gate.set()
    states = await asyncio.wait_for(asyncio.gather(alone, *later), 10)
    assert [s[0].state.id for s in states] == [first, second, third]
    assert calls == [[first], [second, third]]


async def test_reads_are_batched(app: Offload, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [await enqueue(app) for _ in range(20)]
    store = await app._store()
    calls: list[int] = []
    original = store.get_states

    async def counting(task_ids: Any) -> Any:
        calls.append(len(task_ids))
        return await original(task_ids)

    monkeypatch.setattr(store, "get_states", counting)
    gw = app.asgi()
    async with client_for(gw) as client:
        versions = [(await client.get(f"/tasks/{i}")).headers["etag"].strip('"') for i in ids]
        # Answered on any change (since=): a state that is not final is read after its signal on
        # every store (a final one may come with the signal, see the test above).
        pending = [asyncio.create_task(client.get(f"/tasks/{i}?wait=30&since={v}")) for i, v in zip(ids, versions, strict=True)]
        await until(lambda: waiting(gw, "poll") == len(ids))
        # One write for all, as a worker's state writer does: every waiter wakes at once.
        states = [await app._read_state(i) for i in ids]
        for state in states:
            assert state is not None
            state.status, state.progress = Status.STARTED, 0.5
        calls.clear()
        await app._write_states(states)  # type: ignore[arg-type]
        responses = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert all(r.json()["progress"] == 0.5 for r in responses)
    assert sum(calls) >= len(ids)
    assert len(calls) < len(ids)  # fewer reads than waiters: they were batched

