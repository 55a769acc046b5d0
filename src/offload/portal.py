"""A private event loop in a daemon thread: the sync face (`delay()`, `get()`) runs the async
implementation there, so there is one implementation and it never blocks the caller's loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from offload import forks
from offload.errors import UsageError
from offload.loops import loop_factory

T = TypeVar("T")


class Portal:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        forks.after_fork(self._forget)

    def _forget(self) -> None:
        # The thread does not exist in a forked child; start a new one on demand.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        forks.check()
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                loop = loop_factory()()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="offload-portal", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the portal's loop and block until it ends; its value, or its error.

        A lock released by the task's done callback wakes the caller: lighter than
        `run_coroutine_threadsafe`, whose `concurrent.futures.Future` (a condition, callbacks
        chained both ways) costs about a third more CPU per call, and every `delay()` and
        `get()` that is not served from the caller's thread pays it. The task starts in a
        copy of the caller's context, as with `run_coroutine_threadsafe`."""
        loop = self.loop
        if threading.current_thread() is self._thread:
            coro.close()
            raise UsageError("a blocking offload call was made on offload's own loop; use the async form")
        done = threading.Lock()
        done.acquire()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda _: done.release())

        loop.call_soon_threadsafe(start)
        try:
            finished = done.acquire(timeout=-1 if timeout is None else timeout)
        except BaseException:  # interrupted (Ctrl-C): the work stops too
            loop.call_soon_threadsafe(_cancel, started)
            raise
        if not finished:
            loop.call_soon_threadsafe(_cancel, started)
            raise TimeoutError(f"offload call still running after {timeout} s")
        return started[0].result()

    def stop(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


def _cancel(started: list[asyncio.Task[Any]]) -> None:
    for task in started:
        task.cancel()
