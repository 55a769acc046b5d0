"""Per-task and per-call options, honoured by real workers on every broker."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from offload import ConfigError, Status, TaskCancelled, TaskExpired, TaskFailed, TaskTimeLimit
from tests.conformance.conftest import Harness
from tests.support import wait_until


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_priority_higher_runs_first(harness: Harness) -> None:
    log = harness.tmp_path / "order"
    record = harness.task("record")
    results = [record.options(priority=p).delay(str(log), f"p{p}") for p in (1, 5, 9, 0, 7)]
    harness.worker("-c", "1", "--prefetch", "0")
    for r in results:
        r.get(timeout=20)
    assert lines(log) == ["p9", "p7", "p5", "p1", "p0"]


def test_priority_out_of_range_is_refused(harness: Harness) -> None:
    with pytest.raises(ConfigError, match="priority"):
        harness.task("add").options(priority=10)


def test_countdown_and_eta_delay_the_start(harness: Harness) -> None:
    harness.worker()
    sent = time.time()
    r1 = harness.task("add").options(countdown=1.0).delay(1, 1)
    r2 = harness.task("add").options(eta=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).delay(2, 2)
    assert r1.status() is Status.QUEUED
    assert (r1.get(timeout=20), r2.get(timeout=20)) == (2, 4)
    for r in (r1, r2):
        assert r.state().started_at.timestamp() >= sent + 0.95  # type: ignore[union-attr]


def test_naive_eta_is_refused(harness: Harness) -> None:
    with pytest.raises(ConfigError, match="aware"):
        harness.task("add").options(eta=dt.datetime.now())


def test_expired_task_never_runs_and_is_dead_lettered(harness: Harness) -> None:
    log = harness.tmp_path / "ran"
    r = harness.task("record").options(expires=0.2).delay(str(log), "x")
    time.sleep(0.4)  # let the expiry pass before any worker exists: that is the scenario
    harness.worker()
    with pytest.raises(TaskExpired):
        r.get(timeout=20)
    assert r.status() is Status.EXPIRED
    assert not log.exists()
    # The state is stored before the message is dead-lettered (a crash in between redelivers it).
    wait_until(lambda: bool(harness.app._portal.run(_dead(harness))), 10, "the dead letter")
    dead = harness.app._portal.run(_dead(harness))
    assert [(d.id, d.reason.split(":")[0]) for d in dead] == [(r.id, "expired")]


async def _dead(harness: Harness) -> list:  # type: ignore[type-arg]
    return await (await harness.app._broker()).dead_letters()


def test_retries_with_backoff_until_success(harness: Harness) -> None:
    harness.worker()
    log = harness.tmp_path / "attempts"
    r = harness.task("flaky").delay(str(log), 2)
    assert r.get(timeout=30) == 3
    assert lines(log) == ["x", "x", "x"]
    assert r.state().attempts == 3


def test_retries_exhausted_fail_and_dead_letter(harness: Harness) -> None:
    harness.worker()
    log = harness.tmp_path / "attempts"
    r = harness.task("flaky").options(retries=1).delay(str(log), 5)
    with pytest.raises(TaskFailed, match="attempt 2 failed"):
        r.get(timeout=30)
    assert len(lines(log)) == 2
    wait_until(lambda: bool(harness.app._portal.run(_dead(harness))), 10, "the dead letter")
    dead = harness.app._portal.run(_dead(harness))
    assert dead and dead[0].reason.startswith("failed: ConnectionError")


def test_raise_retry_with_countdown(harness: Harness) -> None:
    harness.worker()
    log = harness.tmp_path / "attempts"
    assert harness.task("asks_retry").delay(str(log)).get(timeout=30) == 3
    assert len(lines(log)) == 3


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_time_limit_stops_a_hung_task_and_the_worker_goes_on(harness: Harness, pool: str) -> None:
    harness.worker("--pool", pool, "-c", "1")
    marker = harness.tmp_path / "hung"
    hung = harness.task("hang").options(time_limit=1.0).delay(str(marker))
    with pytest.raises(TaskTimeLimit):
        hung.get(timeout=30)
    assert hung.status() is Status.FAILED
    assert harness.task("add").delay(1, 2).get(timeout=30) == 3


def test_time_limit_on_async_task(harness: Harness) -> None:
    harness.worker()
    r = harness.task("async_touch_then_sleep").options(time_limit=0.5).delay(str(harness.tmp_path / "m"), 30)
    with pytest.raises(TaskTimeLimit):
        r.get(timeout=20)


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_soft_time_limit_raises_inside_the_task(harness: Harness, pool: str) -> None:
    harness.worker("--pool", pool, "-c", "1")
    r = harness.task("soft_limited").options(soft_time_limit=0.5, time_limit=10).delay(str(harness.tmp_path / "m"))
    assert r.get(timeout=30) == "cleaned up after SoftTimeLimitExceeded"


def test_dedup_key_returns_the_existing_task(harness: Harness) -> None:
    first = harness.task("add").options(key="report-42").delay(1, 1)
    second = harness.task("add").options(key="report-42").delay(2, 2)
    assert second.id == first.id
    harness.worker()
    assert second.get(timeout=20) == 2
    third = harness.task("add").options(key="report-42").delay(3, 3)
    assert third.id != first.id and third.get(timeout=20) == 6


def test_cancel_a_queued_task(harness: Harness) -> None:
    log = harness.tmp_path / "ran"
    r = harness.task("record").delay(str(log), "x")
    r.cancel()
    assert r.status() is Status.CANCELLED
    harness.worker()
    assert harness.task("add").delay(1, 1).get(timeout=20) == 2  # the worker is serving
    with pytest.raises(TaskCancelled):
        r.get(timeout=5)
    assert not log.exists()


#: The task each pool is cancelled in: a thread stops at its next `current` call.
RUNNING_TASK_BY_POOL = {"async": "async_touch_then_sleep", "thread": "touch_then_report", "process": "touch_then_sleep"}


@pytest.mark.parametrize("pool", ["async", "thread", "process"])
def test_cancel_a_running_task(harness: Harness, pool: str) -> None:
    harness.worker("--pool", pool, "-c", "1")
    marker = harness.tmp_path / "running"
    r = harness.task(RUNNING_TASK_BY_POOL[pool]).delay(str(marker), 30)
    wait_until(marker.exists, 20, "task start")
    r.cancel()
    with pytest.raises(TaskCancelled):
        r.get(timeout=20)
    assert r.status() is Status.CANCELLED
    assert harness.task("add").delay(1, 1).get(timeout=20) == 2
    assert not Path(f"{marker}.finished").exists()


def test_queues_route_tasks_to_their_workers(harness: Harness) -> None:
    harness.worker("-q", "images", "-c", "1", "--prefetch", "0")
    # The default task goes first: a worker that also consumed `default` would run it, and store
    # its outcome, before the images task that follows.
    on_default = harness.task("add").delay(2, 2)
    on_images = harness.task("add").options(queue="images").delay(1, 1)
    assert on_images.get(timeout=20) == 2
    assert on_default.status() is Status.QUEUED
