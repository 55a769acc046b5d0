"""Periodic tasks: schedules (unit tests), and beats racing each other on every broker: three
real `offload beat` processes at once (memory://: three beats in threads), each due run of an
``every(seconds=1)`` schedule enqueued exactly once, restarts without a double run, and the
catch-up policy."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from offload import ConfigError, Offload, admin, cron, every
from offload.result import Status
from offload.scheduler import Beat, run_id_key, run_task_id
from offload.task import Task
from tests import flows_harness
from tests.conftest import REDIS_URL, require_server
from tests.flows_harness import Harness
from tests.support import OffloadProcess, RedisServer, flush_namespace, wait_until

harness = flows_harness.harness

TICK = "tests.apps.flows.tick"


# -- schedules ------------------------------------------------------------------------------------


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def test_cron_runs_in_the_apps_timezone_across_dst() -> None:
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    nightly = cron("0 3 * * *")
    # 03:00 local both before and after the switch to summer time (2024-03-31)
    assert nightly.next_after(ts("2024-03-30T12:00:00+01:00"), paris) == ts("2024-03-31T03:00:00+02:00")
    assert nightly.next_after(ts("2024-03-31T03:00:00+02:00"), paris) == ts("2024-04-01T03:00:00+02:00")
    assert nightly.next_after(ts("2024-03-30T12:00:00+00:00"), dt.UTC) == ts("2024-03-31T03:00:00+00:00")
    # a timezone of its own wins over the app's
    assert cron("0 3 * * *", timezone="Europe/Paris").next_after(ts("2024-06-01T00:00:00+00:00"), dt.UTC) == ts(
        "2024-06-01T03:00:00+02:00"
    )


def test_every_is_aligned_so_all_beats_agree() -> None:
    two = every(minutes=2)
    assert two.interval_s == 120
    assert two.next_after(ts("2024-01-01T00:01:59+00:00"), dt.UTC) == ts("2024-01-01T00:02:00+00:00")
    assert two.next_after(ts("2024-01-01T00:02:00+00:00"), dt.UTC) == ts("2024-01-01T00:04:00+00:00")
    assert every(hours=1, minutes=30, seconds=15).interval_s == 5415
    assert every(dt.timedelta(seconds=3)).interval_s == 3


@pytest.mark.parametrize(
    "build",
    [lambda: cron("61 * * * *"), lambda: cron("0 3 * *"), lambda: cron("0 0 3 * * *"), lambda: cron("0 3 * * *", timezone="Mars/Olympus"),
     lambda: every(), lambda: every(seconds=-1)],
)
def test_bad_schedules_fail_when_built(build: Any) -> None:
    with pytest.raises(ConfigError):
        build()


def test_periodic_registers_a_task_and_its_schedule() -> None:
    app = Offload("memory://periodic-registry")

    @app.periodic(every(minutes=2), name="sweep", queue="maintenance")
    def sweep() -> None: ...

    @app.periodic(cron("0 3 * * *"), name="nightly-report", catch_up=True)
    def report() -> None: ...

    assert isinstance(sweep, Task) and sweep.name in app.registry and sweep.opts.queue == "maintenance"
    [p_sweep, p_report] = app.periodic_tasks
    assert (p_sweep.name, p_sweep.task, p_sweep.opts.queue, p_sweep.catch_up) == (sweep.name, sweep.name, "maintenance", False)
    assert (p_report.name, p_report.task, p_report.catch_up) == ("nightly-report", "nightly-report", True)
    with pytest.raises(ConfigError):
        app.periodic(every(minutes=2), name="nightly-report")(lambda: None)
    with pytest.raises(ConfigError):
        app.periodic("0 3 * * *")  # a string is not a schedule


def test_an_existing_task_can_be_scheduled_with_options_of_its_own() -> None:
    app = Offload("memory://periodic-existing")

    @app.periodic(every(hours=1), queue="hourly")
    @app.task(name="report", queue="reports")
    def report() -> None: ...

    [p] = app.periodic_tasks
    assert (report.opts.queue, p.task, p.opts.queue) == ("reports", report.name, "hourly")


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_run_ids_are_shared_by_the_apps_of_a_namespace_and_secret_to_anyone_else(store: str, tmp_path: Path) -> None:
    """Two apps of one deployment derive the same id for a run; the same namespace on another
    store (or a fresh namespace) does not, so knowing the schedule and due time is not enough."""
    require_server(store)
    namespace = f"t{uuid.uuid4().hex[:12]}"

    def url(n: int) -> str:
        return f"sqlite:///{tmp_path / f'{n}.db'}" if store == "sqlite" else f"{REDIS_URL.rsplit('/', 1)[0]}/{n}"

    web, beat, elsewhere = Offload(url(1), namespace=namespace), Offload(url(1), namespace=namespace), Offload(url(2), namespace=namespace)
    fresh = Offload(url(1), namespace=namespace + "b")
    apps = (web, beat, elsewhere, fresh)
    try:
        keys = [await run_id_key(app) for app in apps]
        ids = [run_task_id(key, "nightly", 1000) for key in keys]
        assert ids[0] == ids[1] and keys[0] == keys[1]
        assert len({ids[0], ids[2], ids[3]}) == 3
        assert await run_id_key(web) == keys[0]  # created once, then read
        assert run_task_id(keys[0], "nightly", 1000) != run_task_id(keys[0], "nightly", 2000)
        assert run_task_id(keys[0], "nightly", 1000) != run_task_id(keys[0], "weekly", 1000)
        assert len(ids[0]) == 22
    finally:
        for app in apps:
            await flush_namespace(app)
            await app.aclose()


async def test_a_beat_with_nothing_to_do_returns(caplog: pytest.LogCaptureFixture) -> None:
    app = Offload(f"memory://{uuid.uuid4().hex}")
    caplog.set_level(logging.INFO, logger="offload.beat")
    beat = Beat(app)
    try:
        # Returns by itself, without stop(): a beat that waited for runs that never come fails here.
        await asyncio.wait_for(beat.run(), 10)
        assert caplog.messages == ["beat: the app has no periodic tasks (register some with @app.periodic)"]
        assert beat.enqueued == 0
        assert (await admin.status(app)).queued == {}
    finally:
        await app.aclose()


# -- beats racing each other ----------------------------------------------------------------------

ENQUEUED = re.compile(r"enqueued " + re.escape(TICK) + r" \(due (\S+)\) as (\S+)")


class Ticks:
    """What the beats say they enqueued, and what the worker ran."""

    def __init__(self, h: Harness, caplog: pytest.LogCaptureFixture) -> None:
        self.h, self.caplog = h, caplog
        self.beats: list[Any] = []

    def start(self, count: int, *args: str) -> list[Any]:
        started = self.h.beats(count, *args)
        self.beats += started
        return started

    def enqueued(self) -> list[float]:
        """Every due time enqueued by any beat so far, as often as it was enqueued."""
        if self.h.kind == "memory":
            lines = self.caplog.messages
        else:
            lines = [line for b in self.beats for line in b.lines if isinstance(b, OffloadProcess)]
        return sorted(ts(m.group(1)) for line in lines if (m := ENQUEUED.search(line)))

    def ran(self) -> list[float]:
        path = self.h.dir / "ticks"
        return sorted(ts(line.split()[0]) for line in path.read_text().splitlines()) if path.exists() else []

    def wait_ran(self, predicate: Any, message: str) -> None:
        wait_until(lambda: predicate(self.ran()), 15, message)


def contiguous(dues: list[float]) -> bool:
    return all(round(b - a) == 1 for a, b in itertools.pairwise(dues))


def wait_past(instant: float) -> None:
    """Wait until the wall clock has passed a due time (the schedule's own time, not a guess).
    A sleep, because the passing of that time with no beat running is what the test sets up:
    nothing else happens that could be waited on."""
    time.sleep(max(instant - time.time(), 0.0))


def test_three_beats_enqueue_each_run_once_restart_and_catch_up(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h = harness
    caplog.set_level(logging.INFO, logger="offload.beat")
    ticks = Ticks(h, caplog)
    worker = h.workers(1, wait=False)  # starting beside the beats

    # Three beats at once: every due second is enqueued once and runs once, with no gap.
    first = ticks.start(3)
    h.ready(worker)
    ticks.wait_ran(lambda ran: len(ran) >= 2, "two runs")
    h.stop(first)
    phase1 = ticks.enqueued()
    assert len(phase1) == len(set(phase1)) and contiguous(phase1), phase1

    # A restart after a pause: the runs due meanwhile are skipped (no --catch-up), none of the
    # earlier ones is enqueued again, and the new beats carry on once per due time.
    missed = phase1[-1] + 1
    wait_past(missed + 0.2)
    second = ticks.start(3)
    ticks.wait_ran(lambda ran: any(t > missed for t in ran), "a run after the restart")
    h.stop(second)
    phase2 = ticks.enqueued()
    assert missed not in phase2
    assert len(phase2) == len(set(phase2)), phase2

    # With --catch-up, the runs missed while no beat ran are enqueued, each once, by three
    # beats starting together.
    missed = phase2[-1] + 1
    wait_past(missed + 1.2)  # two due times pass with no beat
    ticks.start(3, "--catch-up")
    ticks.wait_ran(lambda ran: missed in ran and missed + 1 in ran, "the missed runs caught up")
    h.stop(ticks.beats[-3:])
    final = ticks.enqueued()
    assert len(final) == len(set(final)), final
    assert contiguous([t for t in final if t >= phase2[-1]])

    # Every enqueued run ran exactly once, under its own id.
    wait_until(lambda: len(ticks.ran()) == len(final), 15, "the worker to run every enqueued run")
    assert ticks.ran() == final
    ids = [line.split()[1] for line in (h.dir / "ticks").read_text().splitlines()]
    assert len(set(ids)) == len(ids)


# -- a broker failing between the claim and the enqueue -------------------------------------------


RUN_KEY = re.compile(r"periodic:tick:\w+:\d+")


async def test_a_run_whose_enqueue_fails_after_its_claim_is_enqueued_once_when_the_broker_is_back(
    namespace: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    require_server("redis")
    caplog.set_level(logging.INFO, logger="offload.beat")
    broker = RedisServer()
    broker.start()
    # The claims live in the store (the shared Redis), the messages in the test's own Redis.
    app = Offload(broker.url, results=REDIS_URL, namespace=namespace)

    @app.periodic(every(seconds=1), name="tick")
    def tick() -> None: ...

    store = await app._store()
    claim = store.set_if_absent
    claimed: list[str] = []
    broker_down = asyncio.Event()

    async def claim_then_stop_the_broker(key: str, value: bytes, ttl_s: float | None = None) -> bool:
        stored = await claim(key, value, ttl_s)
        # The first key a beat takes for a run is its claim; the broker goes down right after.
        if RUN_KEY.fullmatch(key) and not claimed:
            claimed.append(key)
            await asyncio.to_thread(broker.stop)
            broker_down.set()
        return stored

    monkeypatch.setattr(store, "set_if_absent", claim_then_stop_the_broker)
    beat = Beat(app)
    running = asyncio.create_task(beat.run())
    try:
        await asyncio.wait_for(broker_down.wait(), 10)
        due = int(claimed[0].rsplit(":", 1)[1]) / 1000
        failed = "enqueuing failed"
        await wait_for_log(caplog, lambda m: failed in m, "the enqueue to fail")
        await asyncio.to_thread(broker.start)
        # The failed run is enqueued once the broker is back, by the beat's own retry.
        await wait_for_log(caplog, lambda m: f"(due {iso(due)})" in m and "enqueued tick" in m, "the failed run enqueued")
        await wait_for_log(caplog, lambda m: f"(due {iso(due + 1)})" in m and "enqueued tick" in m, "the next run enqueued")
        beat.stop()
        await asyncio.wait_for(running, 10)
        enqueued = [m for m in caplog.messages if m.startswith("enqueued tick")]
        assert len([m for m in enqueued if f"(due {iso(due)})" in m]) == 1
        # Every enqueued run is one message in the broker, the failed one included.
        stats = await admin.status(app)
        assert stats.queued == {"default": beat.enqueued} and beat.enqueued == len(enqueued)
        key = await run_id_key(app)
        state = await app.result(run_task_id(key, "tick", round(due * 1000))).astate()
        assert state.status is Status.QUEUED
    finally:
        running.cancel()
        await flush_namespace(app)
        await app.aclose()
        broker.stop()


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


class _Logged(logging.Handler):
    """Wakes a loop each time a record is logged (after caplog has it: added to the root after it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        super().__init__()
        self.loop, self.event = loop, event

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self.event.set)


async def wait_for_log(caplog: pytest.LogCaptureFixture, match: Any, what: str, timeout: float = 15) -> None:
    """Until a message caplog captured satisfies ``match``; re-checked on each new record."""
    logged = asyncio.Event()
    handler = _Logged(asyncio.get_running_loop(), logged)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        async with asyncio.timeout(timeout):
            while not any(match(m) for m in caplog.messages):
                await logged.wait()
                logged.clear()
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; log: {caplog.messages[-10:]}") from None
    finally:
        root.removeHandler(handler)
