"""The threads that run a worker's sync tasks: values and errors come back to the loop, tasks
run side by side, and closing drops what has not started. Tasks given beyond the threads wait
there: a thread that ends one begins the next without the event loop, their limits and their
cancellation count from that moment, and a shutdown takes back those still waiting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from offload import Offload
from offload.context import TaskContext
from offload.message import Envelope
from offload.worker.executors import Job, ThreadRunner
from offload.worker.threads import TaskThreads


def _holding() -> tuple[Callable[[], bool], threading.Event, threading.Event]:
    """A function that holds its thread until released, and two events: it began; release it."""
    began, release = threading.Event(), threading.Event()

    def hold() -> bool:
        began.set()
        return release.wait(10)

    return hold, began, release


async def test_values_and_errors_come_back_to_the_loop() -> None:
    threads = TaskThreads(2)
    try:
        assert await threads.submit(lambda: threading.current_thread().name) in ("offload-task_0", "offload-task_1")
        with pytest.raises(ZeroDivisionError):
            await threads.submit(lambda: 1 / 0)
        with pytest.raises(SystemExit):  # sys.exit() in a task is its outcome, not the thread's end
            await threads.submit(lambda: exit(3))
        assert await asyncio.gather(*(threads.submit(lambda i=i: i * i) for i in range(50))) == [i * i for i in range(50)]
    finally:
        threads.close()


async def test_tasks_run_side_by_side() -> None:
    threads = TaskThreads(3)
    meet = threading.Barrier(3, timeout=10)  # broken, so failing, unless three run at once
    try:
        # Each waiter gets its own arrival index: all three met.
        assert sorted(await asyncio.gather(*(threads.submit(meet.wait) for _ in range(3)))) == [0, 1, 2]
    finally:
        threads.close()


async def test_close_drops_what_has_not_started() -> None:
    threads = TaskThreads(1)
    hold, started, release = _holding()
    running = threads.submit(hold)
    waiting = threads.submit(lambda: "never")
    assert await asyncio.to_thread(started.wait, 10)
    threads.close()
    release.set()
    assert await running is True
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(RuntimeError, match="closed"):
        threads.submit(lambda: None)
    for thread in threads._threads.values():
        thread.join(10)
        assert not thread.is_alive()


async def test_withdraw_takes_back_only_what_no_thread_has_begun() -> None:
    threads = TaskThreads(1)
    hold, started, release = _holding()
    try:
        running = threads.submit(hold)
        waiting = [threads.submit(lambda i=i: i) for i in range(3)]
        assert await asyncio.to_thread(started.wait, 10)
        assert threads.withdraw() == waiting
        release.set()
        assert await running is True
        for future in waiting:
            assert future.cancelled()
        assert await threads.submit(lambda: "after") == "after"  # the threads serve on
    finally:
        threads.close()


_app = Offload("memory://", namespace="task-threads")


def _job(fn: Callable[[], Any], *, time_limit: float | None = None, task_id: str = "t1") -> Job:
    task = _app.task(name=f"fn_{task_id}_{id(fn)}")(fn)
    env = Envelope(id=task_id, name=task.name, time_limit=time_limit)
    return Job(task, env, TaskContext(task_id, task.name, 1, {}, lambda fraction, message: None, lambda c, d: None))


async def test_the_next_task_begins_while_the_event_loop_is_busy() -> None:
    runner = ThreadRunner(1)
    hold, first_began, first_may_end = _holding()
    second_began = threading.Event()
    try:
        first = asyncio.ensure_future(runner.run(_job(hold, task_id="a")))
        second = asyncio.ensure_future(runner.run(_job(second_began.set, task_id="b")))
        assert await asyncio.to_thread(first_began.wait, 10)  # the first holds the only thread
        assert sorted(runner._submitted.values()) == ["a", "b"]  # and the second waits at the threads
        # Block this loop: the second task must begin without it, when the first ends.
        first_may_end.set()
        assert second_began.wait(10)
        assert (await first).value is True
        assert (await second).kind == "ok"
    finally:
        runner.close()


async def test_a_waiting_task_s_time_limit_counts_from_its_start_not_its_wait() -> None:
    runner = ThreadRunner(1)
    hold, began, release = _holding()
    try:
        blocker = asyncio.ensure_future(runner.run(_job(hold, task_id="a")))
        waiting = _job(lambda: "done", time_limit=0.2, task_id="b")
        outcome = asyncio.ensure_future(runner.run(waiting))
        assert await asyncio.to_thread(began.wait, 10)  # the blocker holds the only thread
        # The time passing is what is tested: longer than its limit, all of it spent waiting.
        await asyncio.sleep(0.5)
        assert waiting.started_at is None and not outcome.done()
        release.set()
        assert (await outcome).value == "done"
        assert waiting.started_at is not None
        await blocker
    finally:
        runner.close()


async def test_a_task_cancelled_while_it_waits_never_runs() -> None:
    runner = ThreadRunner(1)
    hold, began, release = _holding()
    ran: list[str] = []
    try:
        blocker = asyncio.ensure_future(runner.run(_job(hold, task_id="a")))
        waiting = _job(lambda: ran.append("b"), task_id="b")
        outcome = asyncio.ensure_future(runner.run(waiting))
        assert await asyncio.to_thread(began.wait, 10)  # the blocker holds the only thread
        assert sorted(runner._submitted.values()) == ["a", "b"]  # "b" waits at the threads
        waiting.ctx.cancelled = True
        release.set()
        assert (await outcome).kind == "cancelled"
        assert ran == []
        await blocker
    finally:
        runner.close()


async def test_the_runner_withdraws_the_tasks_that_wait() -> None:
    runner = ThreadRunner(1)
    hold, began, release = _holding()
    try:
        running = asyncio.ensure_future(runner.run(_job(hold, task_id="a")))
        waiting = [asyncio.ensure_future(runner.run(_job(lambda: None, task_id=i))) for i in ("b", "c")]
        assert await asyncio.to_thread(began.wait, 10)
        assert runner.withdraw() == {"b", "c"}
        release.set()
        assert (await running).value is True
        for w in waiting:
            with pytest.raises(asyncio.CancelledError):
                await w
    finally:
        runner.close()
