"""The threads that run a worker's sync tasks: values and errors come back to the loop, tasks
run side by side, and closing drops what has not started."""

from __future__ import annotations

import asyncio
import threading

import pytest

from offload.worker.threads import TaskThreads


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
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(10)

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
    for thread in threads._threads:
        thread.join(10)
        assert not thread.is_alive()
