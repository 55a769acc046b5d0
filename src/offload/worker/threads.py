"""The threads that run a worker's sync tasks.

A fixed set of threads reading one queue, each settling the event loop's own future with one
`call_soon_threadsafe`. `loop.run_in_executor` does the same job through a
`concurrent.futures.Future` (with its lock and condition) chained to an asyncio future by
callbacks on both sides: about twice the CPU per task, and a no-op task pays it twice over
(there and back) on the path of every round trip.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from offload.errors import UsageError

T = TypeVar("T")

log = logging.getLogger("offload.worker")

_Work = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile (shutdown)
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class TaskThreads:
    """``size`` threads serving one queue. A thread stuck in a call it cannot be interrupted in
    can be replaced (`replace`): a new thread serves in its place, and the stuck one ends once
    its call returns. At most ``size`` stuck threads are replaced at a time, so that a task
    that hangs every thread it gets cannot make the worker start threads without end."""

    def __init__(self, size: int, name: str = "offload-task") -> None:
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        self._name = name
        self._lock = threading.Lock()  # guards the two collections below and the count
        self._threads: dict[int, threading.Thread] = {}  # serving, by ident
        self._replaced: set[int] = set()  # idents of stuck threads to end when their call returns
        self._started = 0
        with self._lock:
            for _ in range(size):
                self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"{self._name}_{self._started}", daemon=True)
        self._started += 1
        thread.start()
        assert thread.ident is not None  # set by start()
        self._threads[thread.ident] = thread

    def replace(self, ident: int) -> bool:
        """Start a thread in place of the serving thread ``ident``, stuck in its task; that one
        ends when its call returns. False when ``ident`` serves no more or too many are stuck."""
        with self._lock:
            if self._closed or ident not in self._threads or len(self._replaced) >= len(self._threads):
                return False
            del self._threads[ident]
            self._replaced.add(ident)
            self._start_thread()
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stuck(self) -> int:
        """How many replaced threads are still stuck in their call."""
        with self._lock:
            return len(self._replaced)

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn()`` in one of the threads; a future of this loop with its value or error."""
        if self._closed:
            raise UsageError("the task threads are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # The caller's context goes along, as asyncio.to_thread does: what is current where the
        # task is handed over (a tracing span, for one) is current where it runs.
        self._queue.put((loop, future, functools.partial(contextvars.copy_context().run, fn)))
        return future

    def _serve(self) -> None:
        ident = threading.get_ident()
        while True:
            # A time limit's exception is raised into this thread asynchronously; when it lands
            # a moment after the task returned, it must not end the thread.
            try:
                work = self._queue.get()
                if work is None:
                    return
                self._run(*work)
                del work
            except BaseException as e:  # see above
                log.debug("ignored %r raised into a task thread between tasks", e)
            with self._lock:
                if ident in self._replaced:  # another thread serves in its place
                    self._replaced.discard(ident)
                    log.info("a task thread that was stuck past its time limit returned and ends")
                    return

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Callable[[], Any]) -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            try:
                value = fn()
            except BaseException as e:  # the task's error, whatever it is, is its outcome
                error = e
        finally:  # even when a time limit's exception lands just after the task returned
            try:
                loop.call_soon_threadsafe(_settle, future, value, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this outcome any more

    def withdraw(self) -> list[asyncio.Future[Any]]:
        """Take back the work no thread has started; its futures, cancelled. Called on the loop
        that submitted it. A thread takes each piece of work whole, so what comes back here was
        never begun, and what a thread took is not here."""
        withdrawn: list[asyncio.Future[Any]] = []
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return withdrawn
            if work is None:  # closing: the threads still need it to stop
                self._queue.put(None)
                return withdrawn
            _, future, _ = work
            future.cancel()
            withdrawn.append(future)

    def close(self) -> None:
        """Stop the threads once they finish what they run; work not started is dropped."""
        with self._lock:
            self._closed = True
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is not None:
                loop, future, _ = work
                if not loop.is_closed():
                    loop.call_soon_threadsafe(future.cancel)
        with self._lock:
            serving = len(self._threads)
        for _ in range(serving):  # a replaced thread ends by itself
            self._queue.put(None)
