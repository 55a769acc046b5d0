"""A thread stuck in a C call past its task's time limit is replaced: the task ends
TaskTimeLimit and the worker, with its one thread stuck, runs the next task. Real workers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from offload import Status, TaskTimeLimit
from offload.brokers.base import QueueStats
from offload.worker.threads import TaskThreads
from tests.conformance.conftest import Harness
from tests.process_harness import harness, start_app_worker
from tests.support import wait_until

__all__ = ["harness"]

APP = "tests.apps.misbehaving"


def _stats(harness: Harness) -> QueueStats:
    async def read() -> QueueStats:
        broker = await harness.app._broker()
        return await broker.stats()

    return harness.app._portal.run(read())


def test_a_thread_stuck_in_a_c_call_is_replaced_and_the_next_task_runs(harness: Harness) -> None:
    w = start_app_worker(harness, f"{APP}:app", "-c", "1")
    marker = harness.tmp_path / "stuck"
    stuck = harness.app.ref(f"{APP}.stuck_in_c").delay(str(marker))
    wait_until(marker.exists, 20, "the stuck task's start")
    after = harness.app.ref(f"{APP}.add").delay(1, 2)
    with pytest.raises(TaskTimeLimit):
        stuck.get(timeout=20)
    assert after.get(timeout=20) == 3  # the one thread is stuck in libc's sleep(3600)
    w.wait_for(f"task {APP}.stuck_in_c[{stuck.id}] is stuck in its thread past its time limit")
    assert stuck.status() is Status.FAILED
    assert harness.app.ref(f"{APP}.add").delay(2, 2).get(timeout=20) == 4
    if harness.kind != "amqp":  # AMQP does not report another process's deliveries
        # The worker holds no lease any more (none renewed for ever by its heartbeat).
        wait_until(lambda: _stats(harness).running == 0, 20, "no message leased")
    w.terminate()
    assert w.wait(30) == 0


def test_stuck_threads_are_replaced_up_to_the_pool_size_and_end_when_their_call_returns() -> None:
    threads = TaskThreads(1, name="test-stuck")
    release = threading.Event()
    where: list[int] = []

    def blocks() -> str:
        where.append(threading.get_ident())
        release.wait()  # a wait in C: nothing raised into the thread interrupts it
        return "returned"

    async def scenario() -> None:
        stuck = threads.submit(blocks)
        wait_until(lambda: len(where) == 1, 10, "the first thread's start")
        assert threads.replace(where[0])
        assert not threads.replace(where[0])  # it serves no more
        second = threads.submit(blocks)  # the new thread takes it
        wait_until(lambda: len(where) == 2, 10, "the new thread's start")
        assert where[1] != where[0]
        assert not threads.replace(where[1])  # one stuck thread replaced already: the bound of a pool of 1
        assert threads.stuck == 1
        release.set()
        assert await asyncio.wait_for(stuck, 10) == "returned"
        assert await asyncio.wait_for(second, 10) == "returned"
        wait_until(lambda: threads.stuck == 0, 10, "the replaced thread's end")
        assert await asyncio.wait_for(threads.submit(lambda: "served"), 10) == "served"

    try:
        asyncio.run(scenario())
    finally:
        threads.close()
