"""Tasks started for a user are announced to that user once, on their next page, by the
middleware; nobody else hears of them; and a page costs one query of the middleware."""

from __future__ import annotations

import uuid

from django.contrib.auth.models import User
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext

from offload import TaskFailed
from offload.contrib.django import delay_for, for_user
from offload.contrib.django.models import OwnedTask
from tests.django.testapp.tasks import explode, report
from tests.support import OffloadProcess, wait_until


def _user() -> User:
    return User.objects.create_user(f"u{uuid.uuid4().hex[:8]}")


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _finished(task_id: str) -> bool:
    # The worker marks the row just after it stores the final state, so get() can return first.
    return OwnedTask.objects.filter(task_id=task_id, finished_at__isnull=False).exists()


def test_the_owner_is_told_once_and_nobody_else(worker: OffloadProcess) -> None:
    alice, bob = _user(), _user()
    request = RequestFactory().get("/")
    request.user = alice
    r = delay_for(request, report, 5)
    assert r.state().meta["owner"] == str(alice.pk)
    assert r.get(timeout=30)["rows"] == 5
    wait_until(lambda: _finished(r.id), timeout=30, message="the worker marked the task finished")

    assert _client(bob).get("/").content == b""
    alice_client = _client(alice)
    assert alice_client.get("/").content.decode() == "success: Report: 5 rows written"
    assert alice_client.get("/").content == b""
    assert not OwnedTask.objects.filter(task_id=r.id).exists()


def test_failures_are_announced_with_their_error(worker: OffloadProcess) -> None:
    alice = _user()
    r = for_user(alice, explode, label="the nightly import").delay()
    try:
        r.get(timeout=30)
    except TaskFailed as e:
        assert e.message == "the disk is full"
    wait_until(lambda: _finished(r.id), timeout=30, message="the worker marked the task finished")
    assert _client(alice).get("/").content.decode() == "error: The nightly import failed: the disk is full"


def test_the_middleware_costs_one_query_per_page() -> None:
    alice = _user()
    client = _client(alice)
    client.get("/")  # the session is loaded and cached from here on
    with CaptureQueriesContext(connection) as queries:
        client.get("/")
    ours = [q["sql"] for q in queries.captured_queries if "offload_ownedtask" in q["sql"]]
    assert len(ours) == 1, ours


def test_anonymous_users_get_no_owner(worker: OffloadProcess) -> None:
    request = RequestFactory().get("/")
    from django.contrib.auth.models import AnonymousUser

    request.user = AnonymousUser()
    r = delay_for(request, report, 1)
    assert r.get(timeout=30)["rows"] == 1
    assert "owner" not in r.state().meta
    assert not OwnedTask.objects.filter(task_id=r.id).exists()


def test_owned_tasks_never_announced_are_pruned() -> None:
    import datetime as dt

    from offload.contrib.django import owners

    old = OwnedTask.objects.create(task_id=f"old{uuid.uuid4().hex}", owner="1", label="lost",
                                   created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    fresh = OwnedTask.objects.create(task_id=f"new{uuid.uuid4().hex}", owner="1", label="running")
    assert owners.prune(dt.timedelta(days=7)) >= 1
    assert not OwnedTask.objects.filter(pk=old.pk).exists()
    assert OwnedTask.objects.filter(pk=fresh.pk).exists()
    fresh.delete()
