"""Where a task attempt runs: on the worker's event loop (async tasks) or in a thread.

What each can guarantee for time limits and cancellation:

* async: `time_limit` cancels the coroutine; `soft_time_limit` cancels it too (the task sees
  `CancelledError` and may clean up until `time_limit`); cancel() cancels it at its next await.
* thread: `soft_time_limit` raises `SoftTimeLimitExceeded` inside the thread and `time_limit`
  raises `TaskTimeLimit` there, both at the next Python bytecode; a thread blocked inside C
  code (a socket read without timeout) cannot be interrupted, so the worker reports the task as
  timed out and stops waiting for it; a second later, if the thread is still stuck, a new
  thread takes its place (see `TaskThreads.replace`) and the stuck one ends when its call
  returns. cancel() takes effect at the task's next use of `current`.
* process (see process_pool.py): the child is terminated at `time_limit`, always.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from offload.context import TaskContext, reset_context, set_context
from offload.errors import SoftTimeLimitExceeded, TaskCancelled, TaskTimeLimit
from offload.message import Envelope
from offload.task import Task
from offload.worker.outcome import ExpiredBeforeStart, Outcome
from offload.worker.threads import TaskThreads

log = logging.getLogger("offload.worker")

# How long after its time limit's exception a thread that has not let go of its task counts
# as stuck (a thread running Python code lets go at its next bytecode, well within this).
STUCK_AFTER_S = 1.0


@dataclass(slots=True)
class Job:
    task: Task[Any, Any]
    env: Envelope
    ctx: TaskContext
    state_record: dict[str, Any] = field(default_factory=dict)
    # When a thread began it (wall clock, and perf_counter for durations); None while it waits.
    started_at: float | None = None
    started_perf: float = 0.0

    def started(self) -> bool:
        return self.started_at is not None


def limit_message(env: Envelope, seconds: float | None, soft: bool = False) -> str:
    kind = "soft_time_limit" if soft else "time_limit"
    return f"task {env.name}[{env.id}] ran past its {kind} of {seconds} s"


async def run_async(job: Job) -> Outcome:
    """Run an `async def` task on this loop, with its limits."""
    env = job.env
    token = set_context(job.ctx)
    try:
        coro = job.task.fn(*env.args, **env.kwargs)
    finally:
        reset_context(token)
    task = asyncio.create_task(_with_context(coro, job.ctx))
    job.ctx.headers.setdefault("__asyncio_task__", task)
    soft, hard = env.soft_time_limit, env.time_limit
    try:
        if soft is not None:
            done, _ = await asyncio.wait({task}, timeout=soft)
            if not done:
                task.cancel(msg="soft_time_limit")
                remaining = None if hard is None else max(hard - soft, 0.0)
                done, _ = await asyncio.wait({task}, timeout=remaining)
                if not done:
                    return Outcome("timeout", exc_type="TaskTimeLimit", message=limit_message(env, hard))
                if task.cancelled() and not job.ctx.cancelled:
                    return Outcome("error", exc_type="SoftTimeLimitExceeded", message=limit_message(env, soft, soft=True))
        elif hard is not None:
            done, _ = await asyncio.wait({task}, timeout=hard)
            if not done:
                task.cancel()
                return Outcome("timeout", exc_type="TaskTimeLimit", message=limit_message(env, hard))
        else:
            await asyncio.wait({task})
    finally:
        job.ctx.headers.pop("__asyncio_task__", None)
    if task.cancelled():
        return Outcome("cancelled", exc_type="TaskCancelled", message="cancelled")
    exc = task.exception()
    return Outcome("ok", value=task.result()) if exc is None else Outcome.from_exception(exc)


async def _with_context(coro: Any, ctx: TaskContext) -> Any:
    token = set_context(ctx)
    try:
        return await coro
    finally:
        reset_context(token)


def cancel_async(ctx: TaskContext) -> None:
    ctx.cancelled = True
    task = ctx.headers.get("__asyncio_task__")
    if task is not None:
        task.cancel()


def _raise_in_thread(ident: int, exc_type: type[BaseException]) -> None:
    # CPython's documented hook for raising in another thread; it takes effect at the
    # thread's next bytecode, which is the best a thread can offer.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


class ThreadRunner:
    """Runs sync tasks in a fixed set of threads. More tasks may be given than there are threads:
    the others wait at the threads, and a thread that ends one task begins the next at once,
    without waiting for the event loop to hand it over (on a busy loop, that wait was longer
    than a short task). A task's time limits, its start time and its cancellation count from
    the moment a thread begins it; `withdraw` takes back those still waiting."""

    def __init__(self, concurrency: int) -> None:
        self._threads = TaskThreads(concurrency)
        self._submitted: dict[asyncio.Future[Any], str] = {}  # not ended (waiting or running): task id

    async def run(self, job: Job) -> Outcome:
        env = job.env
        soft, hard = env.soft_time_limit, env.time_limit
        loop = asyncio.get_running_loop()
        # Only a task with limits needs to hear when a thread begins it: its clocks start then.
        begun = loop.create_future() if soft is not None or hard is not None else None
        # [thread ident, finished]: written by the task's thread, read here for the limits.
        where: list[Any] = [0, False]

        def call() -> Any:
            # A task that waited for a thread past its expiry is not begun at all.
            if env.expires is not None and time.time() > env.expires:
                raise ExpiredBeforeStart(f"task {env.id} waited for a thread past its expiry")
            job.started_at, job.started_perf = time.time(), time.perf_counter()
            where[0] = threading.get_ident()
            if begun is not None:
                loop.call_soon_threadsafe(_settle_begun, begun)
            token = set_context(job.ctx)
            try:
                if job.ctx.cancelled:  # while it waited for a thread
                    raise TaskCancelled(f"task {env.id} was cancelled")
                return job.task.fn(*env.args, **env.kwargs)
            finally:
                where[1] = True
                reset_context(token)

        future = self._threads.submit(call)
        self._submitted[future] = env.id
        try:
            if begun is None:
                # The common case costs one hand-off each way and nothing else.
                try:
                    return Outcome("ok", value=await future)
                except (Exception, SystemExit) as exc:  # sys.exit() in a task fails the task, not the worker
                    return Outcome.from_exception(exc)
            await asyncio.wait({future, begun}, return_when=asyncio.FIRST_COMPLETED)
            return await self._within_limits(env, future, where, soft, hard)
        finally:
            self._submitted.pop(future, None)

    def withdraw(self) -> set[str]:
        """Take back the tasks still waiting for a thread (shutdown puts them back unrun): their ids."""
        return {self._submitted[f] for f in self._threads.withdraw() if f in self._submitted}

    async def _within_limits(
        self, env: Envelope, future: asyncio.Future[Any], where: list[Any], soft: float | None, hard: float | None
    ) -> Outcome:
        if soft is not None:
            done, _ = await asyncio.wait({future}, timeout=soft)
            if not done and where[0] and not where[1]:
                _raise_in_thread(where[0], SoftTimeLimitExceeded)
            remaining = None if hard is None else max(hard - soft, 0.0)
            done, _ = await asyncio.wait({future}, timeout=remaining)
        else:
            done, _ = await asyncio.wait({future}, timeout=hard)
        if not done:
            if where[0] and not where[1]:
                _raise_in_thread(where[0], TaskTimeLimit)
                asyncio.get_running_loop().call_later(STUCK_AFTER_S, self._replace_if_stuck, env, future, where[0])
            # The thread may be stuck in C code; report the limit and stop waiting for it.
            future.add_done_callback(lambda f: f.exception())
            return Outcome("timeout", exc_type="TaskTimeLimit", message=limit_message(env, hard))
        exc = future.exception()
        if exc is None:
            return Outcome("ok", value=future.result())
        if isinstance(exc, TaskTimeLimit):
            return Outcome("timeout", exc_type="TaskTimeLimit", message=limit_message(env, hard))
        if isinstance(exc, SoftTimeLimitExceeded):
            return Outcome("error", exc_type="SoftTimeLimitExceeded", message=limit_message(env, soft, soft=True))
        return Outcome.from_exception(exc)

    def _replace_if_stuck(self, env: Envelope, future: asyncio.Future[Any], ident: int) -> None:
        """A thread that has not come back from a task STUCK_AFTER_S after its time limit's
        exception was raised in it is in a call that exception cannot interrupt (a C call, a
        read without a timeout): without a new thread in its place, the tasks waiting at the
        threads would wait for as long as it stays stuck."""
        if future.done() or self._threads.closed:  # it let go, or the worker is stopping
            return
        if self._threads.replace(ident):
            log.warning("task %s[%s] is stuck in its thread past its time limit, in a call that cannot be "
                        "interrupted; a new thread takes its place", env.name, env.id)
        else:
            log.error("task %s[%s] is stuck in its thread past its time limit, in a call that cannot be "
                      "interrupted, and %d stuck threads are replaced already: the worker runs fewer sync tasks "
                      "at once until they return (restart it if they never do)", env.name, env.id, self._threads.stuck)

    def close(self) -> None:
        self._threads.close()


def _settle_begun(begun: asyncio.Future[None]) -> None:
    if not begun.done():
        begun.set_result(None)
