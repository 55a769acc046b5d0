"""group, chain, chord and race on every broker, with real worker processes (memory://: worker
threads). Most tests share two workers per broker kind; those that kill a worker, or need none,
have their own."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from offload import (
    ConfigError,
    Status,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    WorkflowResult,
    chain,
    chord,
    group,
    race,
)
from offload.brokers.base import Delivery
from offload.result import Result, TaskState
from offload.task import Signature
from offload.workflow import on_outcome
from tests import flows_harness
from tests.flows_harness import Harness
from tests.support import wait_until

harness = flows_harness.harness
shared = flows_harness.shared

PREFIX_FAST = flows_harness.PREFIX + "fast"
T = 30  # seconds any single workflow may take before a test fails


# -- group ----------------------------------------------------------------------------------------


def test_group_returns_results_in_order(shared: Harness) -> None:
    h = shared
    handle = group(h.s("add", 1, 2), h.s("add", 3, 4), h.s("fast", "x")).delay()
    assert isinstance(handle, WorkflowResult)
    assert handle.get(timeout=T) == [3, 7, "x"]
    assert handle.status() is Status.SUCCEEDED


def test_group_failures_raise_or_come_back_as_values(shared: Harness) -> None:
    h = shared
    handle = group(h.s("add", 1, 1), h.s("fail", "boom"), h.s("add", 2, 2)).delay()
    with pytest.raises(TaskFailed) as info:
        handle.get(timeout=T)
    assert (info.value.exc_type, info.value.message) == ("ValueError", "boom")
    first, failure, last = handle.get(timeout=T, return_exceptions=True)
    assert (first, last) == (2, 4)
    assert isinstance(failure, TaskFailed) and failure.message == "boom"


# -- chain ----------------------------------------------------------------------------------------


def test_chain_feeds_each_result_to_the_next(shared: Harness) -> None:
    h = shared
    assert chain(h.s("add", 1, 2), h.s("add", 10)).delay().get(timeout=T) == 13
    assert chain(h.s("add", 1, 2), h.s("add", 10), h.s("add", 100), h.s("fast")).delay().get(timeout=T) == 113


def test_a_failing_step_stops_the_chain_and_is_its_error(shared: Harness) -> None:
    h = shared
    handle = chain(h.s("add", 1, 2), h.s("fail"), h.s("add", 10)).delay()
    with pytest.raises(TaskFailed) as info:
        handle.get(timeout=T)
    assert (info.value.exc_type, info.value.message) == ("ValueError", "3")
    first, failed, never = handle.children()
    assert first.status() is Status.SUCCEEDED and failed.status() is Status.FAILED
    with pytest.raises(LookupError):  # the step after the failure was never sent
        never.state()


def is_sent(r: Result[Any]) -> bool:
    try:
        return r.state() is not None
    except LookupError:
        return False


def test_a_chain_member_keeps_its_countdown_key_headers_and_expiry(shared: Harness) -> None:
    h = shared
    key = f"member-{uuid.uuid4().hex}"
    member = h.s("headers_of").options(countdown=1.5, expires=60, key=key, headers={"trace": "abc"})
    handle = chain(h.s("add", 1, 2), member).delay()
    first, second = handle.children()
    # Sent when the first step ended, and held back by its countdown: while it waits, its key
    # is taken, so another call with that key is the member itself.
    wait_until(lambda: is_sent(second), T, "the second step sent")
    assert h.app.ref(PREFIX_FAST).options(key=key).delay("other").id == second.id
    result = handle.get(timeout=T)
    assert result["value"] == 3 and result["headers"]["trace"] == "abc"
    started, ended = second.state().started_at, first.state().finished_at
    assert started is not None and ended is not None and (started - ended).total_seconds() >= 1.5
    # An expiry shorter than the countdown: the member expires instead of running.
    expiring = chain(h.s("fast", 1), h.s("fast").options(countdown=1, expires=0.2)).delay()
    with pytest.raises(TaskExpired):
        expiring.get(timeout=T)
    assert expiring.children()[1].status() is Status.EXPIRED


def test_a_signature_keeps_every_option_given_through_the_serializer(shared: Harness) -> None:
    h = shared
    eta = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    given = h.s("fast", 1).options(eta=eta, expires=dt.timedelta(minutes=5), key="k", headers={"a": 1}, priority=7)
    again = Signature.from_dict(h.app, h.app.codec.loads(h.app.codec.dumps(given.to_dict())))
    o = again.opts
    assert (o.eta, o.expires, o.key, o.headers, o.priority) == (eta, 300.0, "k", {"a": 1}, 7)
    later = Signature.from_dict(h.app, given.options(eta=None, countdown=2.5).to_dict())
    assert later.opts.countdown_s == 2.5 and later.opts.eta is None


# -- chord ----------------------------------------------------------------------------------------


def test_chord_calls_back_with_the_list(shared: Harness) -> None:
    h = shared
    path = h.dir / "chord-once"
    handle = chord([h.s("add", 1, 1), h.s("add", 2, 2), h.s("add", 3, 3)], h.s("collect", str(path))).delay()
    assert handle.get(timeout=T) == [2, 4, 6]
    assert len(path.read_text().splitlines()) == 1
    assert chord([h.s("add", 1, 1), h.s("add", 2, 2)], h.s("total")).delay().get(timeout=T) == 6


def test_a_failed_member_fails_the_chord_without_calling_back(shared: Harness) -> None:
    h = shared
    path = h.dir / "chord-failed"
    handle = chord([h.s("add", 1, 1), h.s("fail", "no")], h.s("collect", str(path))).delay()
    with pytest.raises(TaskFailed, match="no"):
        handle.get(timeout=T)
    assert not path.exists()


def test_chord_members_ending_together_on_two_workers_call_back_once(shared: Harness) -> None:
    h = shared
    # Given members that all end at the same wall-clock instant, spread over two workers,
    at = time.time() + 1.0
    paths = [h.dir / f"calls-{i}" for i in range(4)]
    handles = [
        chord([h.s("end_at", at, j) for j in range(8)], h.s("collect", str(path))).delay() for path in paths
    ]
    # then every chord calls back exactly once, with every result in order.
    for handle, path in zip(handles, paths, strict=True):
        assert handle.get(timeout=T) == list(range(8))
        assert len(path.read_text().splitlines()) == 1, path.read_text()


async def test_members_reported_at_the_same_instant_start_the_callback_once(harness: Harness) -> None:
    """The exactly-once guard itself, without timing luck: no worker runs; the test takes the
    members' messages, stores their outcomes and runs the workflow hook for all of them at
    once, twice over (as if every message were delivered again)."""
    h = harness
    app = h.app
    handle = await chord([h.s("add", i, i) for i in range(6)], h.s("total")).adelay()
    broker = await app._broker()
    deliveries: list[Delivery] = []
    while len(deliveries) < 6:
        deliveries += await broker.fetch(["default"], 6, 5)
    envs = [app.codec.decode(d.body) for d in deliveries]
    states = [TaskState(id=e.id, name=e.name, status=Status.SUCCEEDED, result=e.args[0] * 2) for e in envs]
    await app._write_states(states)
    for _ in range(2):
        await asyncio.gather(*(on_outcome(app, e, s) for e, s in zip(envs, states, strict=True)))
    await broker.ack(deliveries)
    callbacks = await broker.fetch(["default"], 10, 2)
    assert len(callbacks) == 1
    callback = app.codec.decode(callbacks[0].body)
    assert callback.name.endswith(".total")
    assert sorted(callback.args[0]) == [0, 2, 4, 6, 8, 10]
    assert await broker.fetch(["default"], 10, 0.3) == []
    await broker.ack(callbacks)
    assert (await handle.astate()).status is Status.STARTED
    await app.aclose()


# -- race -----------------------------------------------------------------------------------------


def test_race_returns_the_first_success_and_cancels_the_rest(shared: Harness) -> None:
    h = shared
    marker = h.dir / "slow-finished"
    handle = race(h.s("slow", 10, "slow", str(marker)), h.s("fast", "fast")).delay()
    assert handle.get(timeout=T) == "fast"
    slow, _ = handle.children()
    with pytest.raises(TaskCancelled):
        slow.get(timeout=T)
    assert not marker.exists()


def test_race_where_all_fail_raises_the_last_failure(shared: Harness) -> None:
    h = shared
    handle = race(h.s("fail", "first"), h.s("fail_after", 0.5, "last")).delay()
    with pytest.raises(TaskFailed) as info:
        handle.get(timeout=T)
    assert info.value.message == "last"


# -- nesting, handles, cancelling, async --------------------------------------------------------


def test_workflows_nest(shared: Harness) -> None:
    h = shared
    # a group inside a chain: each member gets the previous result, the next step the list
    assert chain(h.s("add", 1, 2), group(h.s("add", 10), h.s("add", 20)), h.s("total")).delay().get(timeout=T) == 36
    # a chain inside a group
    assert group(chain(h.s("add", 1, 1), h.s("add", 1)), h.s("add", 5, 5)).delay().get(timeout=T) == [3, 10]
    # a chord inside a chain, a race inside a group
    assert chain(chord([h.s("add", 1, 1), h.s("add", 2, 2)], h.s("total")), h.s("add", 100)).delay().get(timeout=T) == 106
    nested = group(race(h.s("fast", "a"), h.s("fail", "x")), chain(h.s("fast", 2), group(h.s("add", 1), h.s("add", 2))))
    assert nested.delay().get(timeout=T) == ["a", [3, 4]]


def test_a_handle_is_rebuilt_from_its_id_elsewhere(shared: Harness) -> None:
    h = shared
    handle = chain(h.s("add", 1, 2), group(h.s("add", 1), h.s("fail"))).delay()
    elsewhere = h.make_app()  # another app object: its own connections, nothing shared in memory
    try:
        rebuilt = elsewhere.workflow(handle.id)
        with pytest.raises(TaskFailed):
            rebuilt.get(timeout=T)
        with pytest.raises(TaskFailed):
            elsewhere.result(handle.id).get(timeout=T)  # a plain Result works on a workflow id too
        step, inner = rebuilt.children()
        assert step.get(timeout=T) == 3
        assert isinstance(inner, WorkflowResult)
        values = inner.get(timeout=T, return_exceptions=True)
        assert values[0] == 4 and isinstance(values[1], TaskFailed)
        assert rebuilt.state().name == "offload.chain"
    finally:
        elsewhere.close()


def test_cancelling_a_workflow_cancels_what_runs_in_it(shared: Harness) -> None:
    h = shared
    marker = h.dir / "cancelled-finished"
    handle = chain(group(h.s("slow", 10, 1, str(marker)), h.s("slow", 10, 2, str(marker))), h.s("total")).delay()
    first, _ = handle.children()
    members = first.children() if isinstance(first, WorkflowResult) else []
    wait_until(lambda: all(m.status() is Status.STARTED for m in members), 10, "members started")
    handle.cancel()
    with pytest.raises(TaskCancelled):
        handle.get(timeout=T)
    for m in members:
        with pytest.raises(TaskCancelled):
            m.get(timeout=T)
    assert not marker.exists()


def test_members_keep_their_tasks_own_options(shared: Harness) -> None:
    h = shared
    path = h.dir / "fails-once"
    # The sender knows the task by name only: its retries=2 come from the worker's registry.
    assert chain(h.s("fast", str(path)), group(h.s("fails_once"))).delay().get(timeout=T) == [2]


def test_a_member_that_cannot_run_ends_its_workflow(shared: Harness) -> None:
    h = shared
    missing = h.app.ref("tests.apps.flows.missing").s()
    with pytest.raises(TaskFailed) as info:
        chain(h.s("add", 1, 2), missing, h.s("add", 1)).delay().get(timeout=T)
    assert info.value.exc_type == "NotRegistered"


def test_a_member_cancelled_on_its_own_ends_its_group(shared: Harness) -> None:
    h = shared
    marker = h.dir / "member-finished"
    running = group(h.s("slow", 10, 1, str(marker)), h.s("fast", 2)).delay()
    queued = group(h.s("fast", 1).options(queue="nobody-listens"), h.s("fast", 2)).delay()
    slow = running.children()[0]
    wait_until(lambda: slow.status() is Status.STARTED, 10, "the slow member to start")
    slow.cancel()  # running: its worker stops it
    queued.children()[0].cancel()  # still queued: removed from its queue
    for handle in (running, queued):
        with pytest.raises(TaskCancelled):
            handle.get(timeout=T)
        cancelled, value = handle.get(timeout=T, return_exceptions=True)
        assert isinstance(cancelled, TaskCancelled) and value == 2
    assert not marker.exists()


async def test_async_face(shared: Harness) -> None:
    h = shared
    handle = await chain(h.s("add", 1, 2), h.s("add", 10)).adelay()
    assert await handle == 13
    assert await handle.wait(timeout=T) == 13
    failing = await group(h.s("add", 1, 1), h.s("fail", "x")).adelay()
    values = await failing.wait(timeout=T, return_exceptions=True)
    assert values[0] == 2 and isinstance(values[1], TaskFailed)
    await h.app.aclose()


def test_bad_workflows_are_refused_when_built(shared: Harness) -> None:
    h = shared
    with pytest.raises(ConfigError):
        group()
    with pytest.raises(ConfigError):
        chain(h.s("add", 1, 2), "not a signature")


# -- a worker that dies midway --------------------------------------------------------------------


def test_a_chain_survives_its_worker_dying_midway(harness: Harness, tmp_path: Path) -> None:
    h = harness
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    if h.kind == "memory":
        first = h.worker()
    else:  # two from the start, so the second one's start-up is not on the clock
        first, second = h.workers(2)
    handle = chain(h.s("add", 1, 2), h.s("gate", str(gate_dir)), h.s("add", 10)).delay()
    # Given the second step running on a worker,
    wait_until(lambda: any(gate_dir.glob("started-*")), T, "the gate step to start")
    # when that worker dies (killed; memory://'s thread worker is stopped at once) ...
    if h.kind == "memory":
        first.worker.stop(now=True)
        first.join()
    else:
        [started] = gate_dir.glob("started-*")
        [running_it] = [w for w in (first, second) if started.name == f"started-{w.proc.pid}"]
        running_it.kill()
    (gate_dir / "open").write_text("")
    # ... then another worker runs the step again and the chain goes on from the store alone.
    if h.kind == "memory":
        h.worker()
    assert handle.get(timeout=T) == 13
