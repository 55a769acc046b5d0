"""`app.tasks()` end to end, on every broker, with real workers: what ran is listed newest
first, by status, name and queue, and still there for an app made afresh."""

from __future__ import annotations

import datetime as dt

import pytest

from offload import Status, TaskFailed
from tests.conformance.conftest import PREFIX, Harness


def test_what_ran_is_listed_by_status_name_and_queue(harness: Harness) -> None:
    harness.worker("-q", "default,reports")
    first = harness.task("add").delay(1, 2)
    failed = harness.task("fail").delay("no disk")
    report = harness.task("add").options(queue="reports").delay(3, 4)
    assert first.get(timeout=20) == 3 and report.get(timeout=20) == 7
    with pytest.raises(TaskFailed):
        failed.get(timeout=20)
    app = harness.app
    listed = app.tasks()
    assert [s.id for s in listed] == [report.id, failed.id, first.id]
    assert [s.status for s in listed] == [Status.SUCCEEDED, Status.FAILED, Status.SUCCEEDED]
    assert [s.id for s in app.tasks(status="failed")] == [failed.id]
    assert app.tasks(status=Status.FAILED)[0].error["type"] == "ValueError"  # type: ignore[index]
    assert [s.id for s in app.tasks(name=PREFIX + "add")] == [report.id, first.id]
    assert [s.id for s in app.tasks(queue="reports")] == [report.id]
    assert [s.id for s in app.tasks(status="succeeded", queue="default")] == [first.id]
    assert [s.id for s in app.tasks(limit=1)] == [report.id]
    # The next page starts before the last one's queued_at
    assert [s.id for s in app.tasks(limit=2, before=listed[1].queued_at)] == [first.id]
    # A fresh app (a restarted web process) reads the same history from the store
    again = harness.make_app()
    try:
        assert [s.id for s in again.tasks()] == [report.id, failed.id, first.id]
    finally:
        again.close()


def test_a_waiting_task_is_listed_as_queued(harness: Harness) -> None:
    waiting = harness.task("add").options(queue="nobody").delay(1, 1)
    assert [(s.id, s.status, s.queue) for s in harness.app.tasks(status="queued")] == [(waiting.id, Status.QUEUED, "nobody")]


async def test_atasks_is_the_same_list(harness: Harness) -> None:
    sent = await harness.task("add").options(queue="nobody").adelay(1, 1)
    assert [s.id for s in await harness.app.atasks(queue="nobody")] == [sent.id]


@pytest.mark.parametrize("kwargs, says", [
    ({"status": "exploded"}, "unknown status 'exploded'"),
    ({"limit": -1}, "limit must be a whole number"),
    ({"limit": 10**6}, "limit must be a whole number"),
    ({"before": dt.datetime(2026, 1, 1)}, "before must be an aware datetime"),
])
def test_bad_arguments_say_what_is_wrong(harness: Harness, kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        harness.app.tasks(**kwargs)  # type: ignore[arg-type]
