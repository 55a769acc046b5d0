"""The dashboard's HTTP side on every kind: who may see it, what its JSON API returns, its
actions on dead letters (and their CSRF checks), malformed input, and its live stream. Its pages
in a real browser are in test_dashboard_browser.py."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload import ConfigError, Offload, Status
from offload.cli.common import EXIT_USAGE
from offload.gateway.serve import serve
from tests.gateway.conftest import client_for, data, set_state, start_call
from tests.support import run_cli

PASSWORD = "correct horse battery"
AUTH = {"authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def dashboard(app: Offload, **options: Any) -> httpx.AsyncClient:
    return client_for(app.asgi(dashboard=True, dashboard_password=PASSWORD, **options))


async def csrf_token(client: httpx.AsyncClient) -> str:
    page = await client.get("/dashboard/", headers=AUTH)
    assert page.status_code == 200, page.text
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found is not None and found.group(1) != "__CSRF_TOKEN__"
    return found.group(1)


@pytest.mark.parametrize("authorization", [None, "Basic " + base64.b64encode(b"admin:wrong").decode(),
                                           "Basic " + base64.b64encode(f"root:{PASSWORD}".encode()).decode(),
                                           "Basic !!!", "Bearer " + PASSWORD, "Basic \xe9"])
async def test_every_dashboard_route_needs_the_password(authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization.encode("latin-1")}
    async with dashboard(Offload("memory://dash")) as client:
        for path in ("/dashboard/", "/dashboard/static/dashboard.js", "/dashboard/api/overview",
                     "/dashboard/api/tasks", "/dashboard/api/dead", "/dashboard/api/events"):
            refused = await client.get(path, headers=headers)  # type: ignore[arg-type]
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic")
        assert (await client.post("/dashboard/api/dead/purge", json={"all": True}, headers=headers)).status_code == 401  # type: ignore[arg-type]
        assert (await client.get("/dashboard/api/overview", headers=AUTH)).status_code == 200


async def test_without_a_password_only_loopback_clients_are_served() -> None:
    app = Offload("memory://dash")
    async with client_for(app.asgi(dashboard=True)) as local:
        assert (await local.get("/dashboard/api/overview")).status_code == 200
    async with client_for(app.asgi(dashboard=True), client=("192.0.2.7", 4000)) as remote:
        refused = await remote.get("/dashboard/api/overview")
    assert refused.status_code == 403 and "password" in refused.json()["detail"]


def test_the_gateway_refuses_a_public_dashboard_without_a_password() -> None:
    with pytest.raises(ConfigError, match="needs a password"):
        serve(Offload("memory://dash"), host="0.0.0.0", port=0, dashboard=True)
    with pytest.raises(ConfigError, match="dashboard=True"):
        Offload("memory://dash").asgi(dashboard_password=PASSWORD)
    with pytest.raises(ValueError, match="must not be empty"):
        Offload("memory://dash").asgi(dashboard=True, dashboard_password="")


def test_offload_gateway_dashboard_on_a_public_address_needs_the_password(tmp_path: Path) -> None:
    done = run_cli(f"sqlite:///{tmp_path / 'offload.db'}", "dash", "gateway", "tests.apps.basic:app",
                   "--host", "0.0.0.0", "--port", "0", "--dashboard")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "needs a password ($OFFLOAD_DASHBOARD_PASSWORD)" in done.stderr and "Traceback" not in done.stderr


async def test_without_the_flag_there_is_no_dashboard() -> None:
    async with client_for(Offload("memory://dash").asgi()) as client:
        assert (await client.get("/dashboard/", headers=AUTH)).status_code == 404


async def test_overview_tasks_and_detail(app: Offload) -> None:
    held = await app.asend("photos.resize", "a.jpg", width=800)
    # (sent by name to a queue no worker reads: it stays queued)
    failed = await app.asend("photos.stamp", "b.jpg")
    await set_state(app, failed.id, Status.STARTED)
    await set_state(app, failed.id, Status.FAILED, attempts=3,
                    error={"type": "OSError", "message": "disk full", "traceback": "Traceback (most recent call last):\nOSError: disk full"})
    async with dashboard(app) as client:
        overview = (await client.get("/dashboard/api/overview", headers=AUTH)).json()
        listed = (await client.get("/dashboard/api/tasks", params={"status": "failed"}, headers=AUTH)).json()
        everything = (await client.get("/dashboard/api/tasks", params={"limit": 1}, headers=AUTH)).json()
        detail = (await client.get(f"/dashboard/api/tasks/{failed.id}", headers=AUTH)).json()
        queued = (await client.get(f"/dashboard/api/tasks/{held.id}", headers=AUTH)).json()
        public = await client.get(f"/tasks/{failed.id}")
    assert {"name": "default", "depth": 2, "running": 0, "done_per_min": 1} in overview["queues"]
    assert [t["id"] for t in listed["tasks"]] == [failed.id]
    assert [t["id"] for t in everything["tasks"]] == [failed.id] and everything["next_before"] is not None
    assert detail["task"]["error"]["traceback"].endswith("OSError: disk full")
    assert detail["task"]["attempts"] == 3 and detail["task"]["call"] == "stamp('b.jpg')"
    assert queued["task"]["call"] == "resize('a.jpg', width=800)" and queued["task"]["status"] == "queued"
    # The public route shows neither the arguments nor the traceback.
    assert "b.jpg" not in public.text and "Traceback" not in public.text


async def test_a_workflow_member_shows_its_parent_and_children(app: Offload) -> None:
    child = await app.asend("photos.resize", "c.jpg")
    parent = await app.asend("photos.album", "summer")
    await set_state(app, parent.id, Status.STARTED, meta={"workflow": "group", "children": [{"id": child.id}, {"id": "gone"}]})
    await set_state(app, child.id, Status.STARTED, meta={"parent": parent.id, "slot": ["group", 0, 1]})
    async with dashboard(app) as client:
        of_parent = (await client.get(f"/dashboard/api/tasks/{parent.id}", headers=AUTH)).json()
        of_child = (await client.get(f"/dashboard/api/tasks/{child.id}", headers=AUTH)).json()
        unknown = await client.get("/dashboard/api/tasks/no-such-task", headers=AUTH)
    assert [c["id"] for c in of_parent["children"]] == [child.id] and of_parent["parent"] is None
    assert of_child["parent"]["id"] == parent.id and of_child["children"] == []
    assert unknown.status_code == 404


async def dead_letters(app: Offload, count: int) -> list[str]:
    broker = await app._broker()
    for i in range(count):
        await app.asend("photos.resize", f"{i}.jpg")
    found = await broker.fetch(["default"], count, 5.0)
    for delivery in found:
        await broker.dead_letter(delivery, "failed: OSError: disk full")
    return [d.id for d in found]


async def test_dead_letters_replay_and_purge(app: Offload) -> None:
    ids = await dead_letters(app, 3)
    async with dashboard(app) as client:
        token = await csrf_token(client)
        act = {**AUTH, "x-csrf-token": token}
        listed = (await client.get("/dashboard/api/dead", headers=AUTH)).json()["dead"]
        replayed = await client.post("/dashboard/api/dead/replay", json={"ids": [ids[0]]}, headers=act)
        purged = await client.post("/dashboard/api/dead/purge", json={"ids": [ids[1]]}, headers=act)
        left = (await client.get("/dashboard/api/dead", headers=AUTH)).json()["dead"]
        overview = (await client.get("/dashboard/api/overview", headers=AUTH)).json()
    assert sorted(d["id"] for d in listed) == sorted(ids)
    assert {d["name"] for d in listed} == {"photos.resize"} and listed[0]["call"].startswith("resize('")
    assert replayed.json() == {"replayed": [ids[0]]} and purged.json() == {"purged": [ids[1]]}
    assert [d["id"] for d in left] == [ids[2]]
    assert {"name": "default", "depth": 1, "running": 0, "done_per_min": 0} in overview["queues"]


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({}, '{"all": true}', 403),  # no CSRF token
    ({"x-csrf-token": "stale"}, '{"all": true}', 403),
    ({"origin": "http://evil.example"}, '{"all": true}', 403),
    ({"content-type": "text/plain"}, '{"all": true}', 415),
    ({}, "{not json", 400),
    ({}, '{"ids": []}', 400),
    ({}, '{"ids": [7]}', 400),
    ({}, '["all"]', 400),
    ({}, '{"all": "yes"}', 400),
])
async def test_a_refused_action_changes_nothing(app: Offload, headers: dict[str, str], body: str, status: int) -> None:
    [dead_id] = await dead_letters(app, 1)
    async with dashboard(app) as client:
        token = await csrf_token(client)
        sent = {**AUTH, "content-type": "application/json", **({"x-csrf-token": token} if status != 403 or "origin" in headers else {}), **headers}
        refused = await client.post("/dashboard/api/dead/purge", content=body, headers=sent)
        left = (await client.get("/dashboard/api/dead", headers=AUTH)).json()["dead"]
    assert refused.status_code == status, refused.text
    assert [d["id"] for d in left] == [dead_id]


@pytest.mark.parametrize("query", ["status=bogus", "limit=0", "limit=501", "limit=2.5", "limit=abc", "before=nan",
                                   "before=soon"])
async def test_malformed_queries_are_4xx(query: str) -> None:
    async with dashboard(Offload("memory://dash")) as client:
        response = await client.get(f"/dashboard/api/tasks?{query}", headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


async def test_the_live_stream_sends_the_overview_and_a_task_as_it_changes(app: Offload) -> None:
    task = await app.asend("photos.resize", "d.jpg")
    asgi = app.asgi(dashboard=True, dashboard_password=PASSWORD)
    call = start_call(asgi, "/dashboard/api/events", f"task={task.id}", headers=AUTH)
    try:
        assert await call.status == 200
        first, second = await call.events(2)
        assert (first["event"], second["event"]) == ("overview", "task")
        assert data(second)["task"]["status"] == "queued"
        await set_state(app, task.id, Status.STARTED, progress=0.5)
        while True:
            [event] = await call.events(1)
            if event["event"] == "task":
                break
        assert data(event)["task"]["progress"] == 0.5
    finally:
        call.disconnect()
        await call.finish()


async def test_the_dashboard_without_its_slash_redirects_to_it() -> None:
    async with dashboard(Offload("memory://dash")) as client:
        moved = await client.get("/dashboard", headers=AUTH)
    assert moved.is_redirect and moved.headers["location"].endswith("/dashboard/")
