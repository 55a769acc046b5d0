"""What happens to one leased message.

Order of events::

    decode -> [malformed/tampered: FAILED (if still queued) + dead letter]
           -> [revoked: cancelled] -> [expired: expired + dead letter]
           -> wait for a place -> [expired meanwhile: expired + dead letter]
           -> STARTED -> run (async | thread | process) -> outcome stored -> ack
                                                         -> retry: RETRYING + requeue
                                                         -> final failure: FAILED + dead letter
    an error of the worker itself at any step -> put back, twice; the third time FAILED + dead letter

The endings are `Settle`'s; the worker's fetch loop owns the places and starts one `process`
per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Literal

from offload import history
from offload.app import Offload
from offload.brokers.base import Broker, Delivery, Verdict
from offload.brokers.states import StateRow
from offload.context import TaskContext
from offload.errors import MessageError, SignatureError
from offload.logs import task_fields
from offload.message import Envelope
from offload.result import Status, TaskState
from offload.task import Task
from offload.worker.executors import Job, ThreadRunner, run_async
from offload.worker.heartbeat import Heartbeat
from offload.worker.outcome import Outcome
from offload.worker.process_pool import ProcessRunner
from offload.worker.settle import Settle
from offload.worker.writer import StateWriter

log = logging.getLogger("offload.worker")

Pool = Literal["thread", "process", "async"]
# STARTED is stored only once a task has run this long: a short task's first stored state after
# QUEUED is its outcome, which saves a write and keeps it off the path to the waiting caller.
STARTED_AFTER_S = 0.02


@dataclass(slots=True)
class Held:
    """A message this worker holds a lease on."""

    delivery: Delivery
    env: Envelope | None = None
    ctx: TaskContext | None = None
    state: TaskState | None = None
    task: asyncio.Task[None] | None = None
    #: Put back by a shutdown whose grace period ran out: whatever it ends with is not settled.
    put_back: bool = False


class Pipeline:
    """Runs one message from its lease to its settlement. Built inside the worker's loop."""

    def __init__(
        self, app: Offload, broker: Broker, writer: StateWriter, settle: Settle, *, pool: Pool,
        threads: ThreadRunner | None, procs: ProcessRunner | None, slots: asyncio.Semaphore,
        stopping: asyncio.Event, revoked: Container[str], heartbeat: Heartbeat,
    ) -> None:
        self._app, self._broker, self._writer, self._settle = app, broker, writer, settle
        self._heartbeat = heartbeat
        self._pool, self._threads, self._procs = pool, threads, procs
        self._slots, self._stopping, self._revoked = slots, stopping, revoked
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    async def process(self, held: Held) -> None:
        """Take the message through to its end; an error raised is the worker's own (see
        `Settle.after_internal_error`)."""
        d = held.delivery
        env = self._read(d)
        # The one gate for a broker that hands messages out before admitting them: nothing
        # below (a state written, a hook called, a run) happens before its verdict.
        if not await self._admitted(held):
            return
        if isinstance(env, MessageError):
            await self._reject(d, env)
            return
        task = self._app.registry.get(env.name)
        if task is not None:
            env = env.with_defaults(
                task.opts.retries, task.opts.retry_backoff_s, task.opts.time_limit_s, task.opts.soft_time_limit_s,
                _relative_seconds(task.opts.expires),
            )
        held.env = env
        log.info("received %s[%s] attempt %d", env.name, env.id, env.attempt, extra=task_fields(env.id, env.name, d.queue, env.attempt))
        state = TaskState(
            id=env.id, name=env.name, status=Status.STARTED, attempts=env.attempt, queue=d.queue,
            queued_at=dt.datetime.fromtimestamp(env.queued_at, dt.UTC),
            meta=env.state_meta(),
        )
        if await self._ended_unrun(d, env, state):
            return
        if task is None:
            await self._settle.not_registered(d, env, state)
            return
        # Not hooks.call_each, as the start and outcome hooks are: here each hook's answer
        # counts, and the first to hold the message back ends the round.
        for admit in self._app.admission_hooks:
            wait_s = await admit(env, task)
            if wait_s:
                log.debug("held back %s[%s] for %.2f s", env.name, env.id, wait_s)
                await self._broker.requeue(d, None, wait_s)
                return
        with contextlib.ExitStack() as wrapped:
            learners = [wrapped.enter_context(wrap(env)) for wrap in self._app.run_wrappers]
            await self._run_and_settle(held, task, env, state, learners)

    async def _run_and_settle(
        self, held: Held, task: Task[Any, Any], env: Envelope, state: TaskState, learners: list[Callable[[Outcome], None]],
    ) -> None:
        """From waiting for a place to the settlement, inside the app's run wrappers, each of
        whose ``learners`` hears the outcome of a run."""
        d = held.delivery
        # Sync tasks of the thread pool go to the threads at once and wait there (see
        # ThreadRunner); the worker never leases more than its places, so they need no
        # semaphore of their own.
        places = self._slots if task.is_async or self._pool != "thread" else contextlib.nullcontext()
        async with places:
            if self._stopping.is_set():
                return  # shutdown began while this waited for a slot: the worker puts it back
            # Again, now: waiting for a slot, or held back by a hook, may have taken it past.
            if await self._ended_unrun(d, env, state):
                return
            outcome, elapsed_ms = await self._run(held, task, env, state)
        for learn in learners:
            learn(outcome)
        if not await self._heartbeat.confirm(d, env.name, env.attempt):
            return
        if outcome.kind == "expired":  # it waited for a thread past its expiry, and never ran
            await self._settle.expire(d, env, state)
            return
        assert held.ctx is not None
        if (held.ctx.cancelled and outcome.kind != "ok") or outcome.kind == "cancelled":
            if held.put_back:
                return
            log.info("cancelled %s[%s] after %.1f ms", env.name, env.id, elapsed_ms,
                     extra=task_fields(env.id, env.name, d.queue, env.attempt, elapsed_ms))
            await self._settle.finish(d, env, state, Status.CANCELLED)
            return
        await self._settle.outcome(d, env, state, outcome, elapsed_ms)

    async def _ended_unrun(self, d: Delivery, env: Envelope, state: TaskState) -> bool:
        """Cancelled, or past its expiry: settled so without running. False when it may run."""
        if env.id in self._revoked:
            await self._settle.finish(d, env, state, Status.CANCELLED)
            return True
        if _past_expiry(env):
            await self._settle.expire(d, env, state)
            return True
        return False

    def _read(self, d: Delivery) -> Envelope | MessageError:
        """The message's envelope, verified and decoded; or why it cannot be read."""
        try:
            return self._app.codec.decode(d.body)
        except MessageError as e:
            return e

    async def _reject(self, d: Delivery, error: MessageError) -> None:
        if isinstance(error, SignatureError):
            log.error("dead-lettered message %s: %s", d.id, error)
            refused = f"the worker refused the message: {error} (the sender and the workers must share one secret)"
            await self._settle.reject(d, "MessageRefused", refused, f"rejected: {error}")
        else:
            log.error("dead-lettered malformed message %s: %s", d.id, error)
            await self._settle.reject(
                d, "MessageMalformed", f"the worker could not read the message: {error}", f"malformed: {error}"
            )

    async def _run(self, held: Held, task: Task[Any, Any], env: Envelope, state: TaskState) -> tuple[Outcome, float]:
        """Run the task in its executor, STARTED stored on the way; the outcome and the ms taken."""
        state.started_at = dt.datetime.now(dt.UTC)
        held.state = state
        held.ctx = TaskContext(env.id, env.name, env.attempt, dict(env.headers), self._progress_reporter(held), self._publisher())
        # A sync task of the thread pool may wait for a thread a while: said so, not "started".
        in_threads = not task.is_async and self._procs is None
        log.info("%s %s[%s]", "handed to the task threads" if in_threads else "started", env.name, env.id,
                 extra=task_fields(env.id, env.name, held.delivery.queue, env.attempt))
        started = time.perf_counter()
        job = Job(task, env, held.ctx)
        started_record = job.state_record = state.to_record()  # a snapshot: `state` changes later

        listing = history.listing(state)

        def started_bytes() -> StateRow:
            return StateRow(env.id, self._app.codec.dumps(started_record), listing)

        if task.is_async:
            self._writer.put_later(env.id, started_bytes, STARTED_AFTER_S)
            outcome = await run_async(job)
        elif self._procs is not None:
            # The child writes progress itself; STARTED must be stored before it can.
            await self._writer.put(env.id, started_bytes())
            outcome = await self._procs.run(job)
        else:
            assert self._threads is not None

            def begun_bytes() -> StateRow:
                started_record["started_at"] = job.started_at
                return started_bytes()

            # STARTED only once a thread has begun it, and then with that moment.
            self._writer.put_later(env.id, begun_bytes, STARTED_AFTER_S, ready=job.started)
            outcome = await self._threads.run(job)
            if job.started_at is not None:
                state.started_at = dt.datetime.fromtimestamp(job.started_at, dt.UTC)
                started = job.started_perf
        elapsed_ms = (time.perf_counter() - started) * 1000
        _keep_last_report(state, outcome.last_report or held.ctx.last_report, outcome.kind == "ok")
        return outcome, elapsed_ms

    async def _admitted(self, held: Held) -> bool:
        """Wait for the broker's verdict on a message it handed out before its cancellation
        check came back (`Delivery.admitted`; see `Broker.hands_out_early`), at once when there
        is none to wait for. False when the message is settled otherwise:
        revoked (acked here, unrun; the canceller stored its state) or taken back by the broker
        (its check failed; the broker tries again)."""
        d = held.delivery
        pending, d.admitted = d.admitted, None
        if pending is None:
            return True
        verdict = await pending
        if verdict is Verdict.RUN:
            return True
        if verdict is Verdict.REVOKED:
            log.info("dropping cancelled message %s", d.id)
            await self._broker.ack([d])
        return False

    # -- what `current` calls -------------------------------------------------------------------
    def _progress_reporter(self, held: Held) -> Any:
        loop = self._loop

        def report(fraction: float | None, message: str | None) -> None:
            def put() -> None:
                state = held.state
                if state is None or state.status is not Status.STARTED:
                    return
                state.progress, state.message = fraction, message
                self._writer.put(state.id, self._app.state_row(state))

            if threading.get_ident() == self._loop_thread:
                put()
            else:
                loop.call_soon_threadsafe(put)

        return report

    def _publisher(self) -> Any:
        loop = self._loop

        def publish(channel: str, data: Any) -> None:
            if threading.get_ident() == self._loop_thread:
                loop.create_task(self._app.apublish(channel, data))
            else:
                asyncio.run_coroutine_threadsafe(self._app.apublish(channel, data), loop).result()

        return publish


def _keep_last_report(state: TaskState, report: tuple[float | None, str | None] | None, succeeded: bool) -> None:
    """The final state shows the task's last progress() call, even one the throttle did not
    write; a task that succeeded after reporting a fraction reads 1.0, not where its last
    write happened to fall."""
    if report is None:
        return
    fraction, message = report
    state.progress = 1.0 if succeeded and fraction is not None else fraction
    state.message = message


def _past_expiry(env: Envelope) -> bool:
    return env.expires is not None and time.time() > env.expires


def _relative_seconds(expires: Any) -> float | None:
    """A task's default `expires` if it is relative (seconds or timedelta), else None."""
    if isinstance(expires, dt.timedelta):
        return expires.total_seconds()
    if isinstance(expires, (int, float)):
        return float(expires)
    return None
