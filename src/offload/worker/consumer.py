"""The worker: lease messages, run them, store outcomes, acknowledge.

Order of events for one message::

    fetch (leased) -> decode -> [malformed/tampered: FAILED (if still queued) + dead letter]
                   -> [revoked: cancelled] -> [expired: expired + dead letter]
                   -> wait for a place -> [expired meanwhile: expired + dead letter]
                   -> STARTED -> run (async | thread | process) -> outcome stored -> ack
                                                                 -> retry: RETRYING + requeue
                                                                 -> final failure: FAILED + dead letter
    an error of the worker itself at any step -> put back, twice; the third time FAILED + dead letter

A heartbeat renews the leases of everything this worker holds, so a long task is never handed
to a second worker while this one lives; when the worker dies, the leases run out and the
messages are delivered again (at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from offload.app import Offload
from offload.brokers.base import Broker, Delivery, Store, Verdict
from offload.channels import CONTROL_CHANNEL
from offload.context import TaskContext
from offload.errors import BrokerUnavailable, ConfigError, MessageError, SerializationError, SignatureError, UsageError
from offload.hooks import call_each
from offload.loops import loop_kind
from offload.message import Envelope
from offload.result import Status, TaskState
from offload.worker.executors import Job, ThreadRunner, cancel_async, run_async
from offload.worker.heap import freeze_startup_heap
from offload.worker.outcome import Outcome, backoff_delay
from offload.worker.process_pool import ProcessRunner
from offload.worker.writer import StateWriter

log = logging.getLogger("offload.worker")

Pool = Literal["thread", "process", "async"]
# How long one fetch waits for a message. Brokers wake a waiting fetch the moment a message
# arrives, so this only bounds how soon an idle worker notices a stop request.
FETCH_WAIT_S = 0.5
BURST_FETCH_WAIT_S = 0.25
# A burst worker with nothing ready still stays while a scheduled message of its queues comes
# due this soon: a retry it has just scheduled (a short countdown, a first backoff of at most
# 1 s by default) is part of its work, not a task for the next run.
BURST_HORIZON_S = 1.0
# A broker unreachable at start-up is tried again after about 0.5, 1, 2, 4, 8, then 10 s (each
# +-25 %, so that workers started together do not knock together): a daemon's supervisor
# expects it to wait for its broker rather than exit.
CONNECT_RETRY_FIRST_S = 0.5
CONNECT_RETRY_MAX_S = 10.0
# How long a burst worker (a cron job, a CI step) waits for its broker unless told: it is
# expected to end, so it gives up and says so; a daemon waits as long as it takes.
BURST_CONNECT_TIMEOUT_S = 30.0
REVOKED_REMEMBERED = 10_000
# A message the worker fails on (not the task: the worker itself, a hook, the store) goes back
# this many times less one, a pause apart, then to the dead letters.
INTERNAL_ERRORS_BEFORE_DEAD = 3
INTERNAL_ERROR_PAUSE_S = 1.0
# STARTED is stored only once a task has run this long: a short task's first stored state after
# QUEUED is its outcome, which saves a write and keeps it off the path to the waiting caller.
STARTED_AFTER_S = 0.02


@dataclass(slots=True)
class _Held:
    """A message this worker holds a lease on."""

    delivery: Delivery
    env: Envelope | None = None
    ctx: TaskContext | None = None
    state: TaskState | None = None
    task: asyncio.Task[None] | None = None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Worker:
    """Consumes ``queues`` with ``concurrency`` tasks at a time. ``run()`` does the side effects
    (signal handlers, child processes); the constructor only checks its arguments.

    ``handle_signals`` (the default) is for a worker that owns its process, as ``offload
    worker`` does: SIGTERM and SIGINT stop it gracefully, and once it is ready its start-up heap
    is frozen (see `freeze_startup_heap`). A worker run in a thread of a larger program leaves
    both to that program.
    """

    def __init__(
        self,
        app: Offload,
        *,
        queues: list[str] | tuple[str, ...] = ("default",),
        concurrency: int | None = None,
        pool: Pool = "thread",
        prefetch: int | None = None,
        burst: bool = False,
        grace_s: float = 30.0,
        max_tasks_per_child: int | None = None,
        handle_signals: bool = True,
        connect_timeout_s: float | None = None,
    ) -> None:
        if pool not in ("thread", "process", "async"):
            raise ConfigError(f"pool must be thread, process or async, got {pool!r}")
        if pool == "process" and app.spec is None:
            raise ConfigError("the process pool needs the app's import path: start it with `offload worker module:app`")
        if pool == "process" and app.url.scheme == "memory":
            raise ConfigError("memory:// lives in one process; use the thread or async pool with it")
        self.app = app
        self.queues = list(queues)
        self.pool: Pool = pool
        default_concurrency = {"thread": 8, "process": max(1, _cpu_count()), "async": 100}[pool]
        self.concurrency = concurrency or default_concurrency
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        # Bounded prefetch: a worker never leases more than it can start soon, so it cannot
        # hoard a queue that other workers could be draining.
        self.prefetch = self.concurrency if prefetch is None else prefetch
        self.burst = burst
        if connect_timeout_s is not None and not connect_timeout_s >= 0:
            raise ConfigError(f"connect_timeout_s must be 0 or more seconds, got {connect_timeout_s!r}")
        #: How long run() waits for an unreachable broker before it raises BrokerUnavailable
        #: (0: one attempt; math.inf: forever). None: forever, or BURST_CONNECT_TIMEOUT_S in burst mode.
        self.connect_timeout_s = connect_timeout_s
        self.grace_s = grace_s
        self.max_tasks_per_child = max_tasks_per_child
        self.handle_signals = handle_signals
        self.processed = 0
        self._held: dict[str, _Held] = {}
        self._revoked: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Internal errors per message id (see _after_internal_error); the oldest forgotten first.
        self._internal_errors: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Events and the loop belong to run(): they are created on the worker's own loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._abandoned = False
        self._serving = False  # connected: past the wait for the broker
        self._signals_seen = 0
        self._background: set[asyncio.Future[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self, now: bool = False) -> None:
        """Stop fetching; let running tasks finish within the grace period (or not, with now)."""
        if self._loop is None:
            raise UsageError("the worker is not running: stop() is for a worker whose run() has started")
        self._loop.call_soon_threadsafe(self._request_stop, now)

    def _request_stop(self, now: bool = False) -> None:
        self._signals_seen += 1
        assert self._stopping is not None
        if not self._serving:
            if not self._stopping.is_set():
                log.info("stopping: no longer waiting for the broker")
        elif self._stopping.is_set() or now:
            if not self._abandoned:
                log.warning("stopping now: putting back %d running task(s)", len(self._held))
            self._now.set()
        else:
            log.info("stopping: no new tasks; waiting up to %.0f s for %d running", self.grace_s, len(self._held))
        self._stopping.set()
        self._space.set()

    async def run(self, on_ready: Callable[[], Any] | None = None) -> int:
        """Serve until stopped (or, in burst mode, until the queues are empty). Returns an exit code.

        A broker (or result store) that cannot be reached is tried again with backoff, a warning
        each time, for up to ``connect_timeout_s``; then `BrokerUnavailable` is raised. A stop
        while it waits returns 0 at once. ``on_ready`` is called once the worker is connected
        and ready, before it takes its first task."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = asyncio.Event()
        self._now = asyncio.Event()
        self._space = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        # Before connecting: a stop must work while the worker waits for its broker.
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._request_stop)
        try:
            if not await self._connect():
                log.info("worker stopped before it could reach the broker")
                return 0
            self._serving = True
            return await self._serve(on_ready)
        finally:
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(sig)

    async def _connect(self) -> bool:
        """Open the app's broker and store, waiting for them as `run` says. False when a stop
        came first."""
        assert self._stopping is not None
        limit = self.connect_timeout_s
        if limit is None:
            limit = BURST_CONNECT_TIMEOUT_S if self.burst else math.inf
        loop = asyncio.get_running_loop()
        began = loop.time()
        attempt = 0
        while True:
            attempt += 1
            connecting = asyncio.ensure_future(self.app._backends())
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait((connecting, stop), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # run() itself cancelled: the attempt must not live on
                connecting.cancel()
                raise
            finally:
                stop.cancel()
            if not connecting.done():
                # Cut short: each attempt may take the backend's own connect timeout, seconds.
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                return False
            try:
                backends = connecting.result()
            except BrokerUnavailable as e:
                waited = loop.time() - began
                if waited >= limit:
                    if attempt == 1:
                        raise
                    raise BrokerUnavailable(
                        e.url, f"{e.reason}; gave up after waiting {waited:.1f} s for it (connect timeout {limit:g} s)"
                    ) from e
                pause = min(_connect_pause(attempt), limit - waited)
                log.warning("broker %s unavailable (%s); retrying in %.1f s", e.url, e.reason, pause)
                await _first(asyncio.sleep(pause), self._stopping.wait())
                if self._stopping.is_set():
                    return False
                continue
            if self._stopping.is_set():
                return False  # the caller closes the connections with the app
            if attempt > 1:
                log.info("reached the broker after %.1f s (attempt %d)", loop.time() - began, attempt)
            self.broker: Broker = backends.broker
            self.store: Store = backends.store
            return True

    async def _serve(self, on_ready: Callable[[], Any] | None) -> int:
        assert self._loop is not None
        self.broker.hands_out_early = True  # see _admitted
        self._capacity = self.concurrency + self.prefetch
        self._reserved = 0  # places promised to a fetch or a refill in flight
        self._backlog = False  # the last claim filled every place asked: the queues have more
        # The writer asks for refills only where the broker can do them with this store.
        self.writer = StateWriter(self.store, self.broker, self.app.result_ttl_s, self)
        # With the async pool, a sync task still needs somewhere to run that is not the loop.
        self.threads = ThreadRunner(self.concurrency if self.pool == "thread" else 8) if self.pool != "process" else None
        self.procs = None
        await call_each(self.app.worker_start_hooks)
        if self.pool == "process":
            assert self.app.spec is not None
            self.procs = ProcessRunner(self.app.spec, self.concurrency, self.max_tasks_per_child)
            await self.procs.start()
        if self.handle_signals:
            freeze_startup_heap()
        log.info(
            "worker ready: %s namespace=%s queues=%s pool=%s concurrency=%d loop=%s",
            self.app.url.masked, self.app.namespace, ",".join(self.queues), self.pool, self.concurrency,
            loop_kind(asyncio.get_running_loop()),
        )
        if on_ready is not None:
            on_ready()
        helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._listen_control())]
        try:
            await self._fetch_loop()
            await self._drain()
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.writer.flush()
            await asyncio.gather(*self._background, return_exceptions=True)
            if self.threads is not None:
                self.threads.close()
            if self.procs is not None:
                await self.procs.close()
        log.info("worker stopped after %d task(s)", self.processed)
        return 0

    async def _fetch_loop(self) -> None:
        assert self._stopping is not None
        capacity = self._capacity
        failures = 0
        while not self._stopping.is_set():
            free = capacity - len(self._held) - self._reserved
            # Claim when at least half the places are free (or all, when idle), so that one
            # round trip to the broker serves several tasks instead of one. While the queues
            # have a backlog and the writer has a batch to write, the batch claims instead (a
            # refill with its acks: see ask and got).
            if free <= 0 or (self._held and free < (capacity + 1) // 2) or (self.writer.refilling and self._more_ready()):
                self._space.clear()
                await self._space.wait()  # set when a message is let go, and on stop
                continue
            self._reserved += free
            try:
                deliveries = await self.broker.fetch(self.queues, free, BURST_FETCH_WAIT_S if self.burst else FETCH_WAIT_S)
                failures = 0
            except Exception as e:
                failures += 1
                pause = min(0.2 * 2**failures, 5.0)
                log.warning("fetch failed (%s); retrying in %.1f s", e, pause)
                await _first(asyncio.sleep(pause), self._stopping.wait())
                continue
            finally:
                self._reserved -= free
            self._backlog = len(deliveries) == free
            self._start(deliveries)
            if deliveries:
                # Let the new tasks start (up to their first wait) before the next fetch goes out.
                await asyncio.sleep(0)
            if self.burst and not deliveries and not self._held and not await self._due_soon() and not self._held:
                return

    async def _due_soon(self) -> bool:
        """Burst mode, nothing ready and nothing held: does a scheduled message of the queues
        come due within BURST_HORIZON_S? Then the worker stays for it."""
        try:
            return await self.broker.due_within(self.queues, BURST_HORIZON_S)
        except Exception as e:  # the next fetch (which waits a while) and this check try again
            log.warning("could not tell whether a scheduled task is due soon (%s); looking again", e)
            return True

    def _start(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            held = self._held[d.id] = _Held(d)
            held.task = asyncio.create_task(self._handle(held))

    # -- the writer's refill (see StateWriter): claims that ride along with a batch of acks ------
    def _more_ready(self) -> bool:
        """The queues have more: the last claim filled every place, or the broker holds some."""
        return self._backlog or self.broker.local_ready(self.queues) > 0

    def ask(self) -> tuple[list[str], int] | None:
        assert self._stopping is not None
        free = self._capacity - len(self._held) - self._reserved
        if free <= 0 or self._stopping.is_set() or not self._more_ready():
            return None
        self._reserved += free
        return self.queues, free

    def got(self, asked: tuple[list[str], int] | None, deliveries: list[Delivery]) -> None:
        assert self._stopping is not None
        if asked is None:
            self._space.set()  # a batch went out: the fetch loop looks again
            return
        self._reserved -= asked[1]
        self._backlog = len(deliveries) == asked[1]
        if self._stopping.is_set():
            for d in deliveries:  # too late to start: back to the queue at once
                self._loop_task(self._give_back(d))
        else:
            self._start(deliveries)
        self._space.set()  # the fetch loop looks again (and takes over if the queues ran dry)

    def _loop_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back(self, delivery: Delivery) -> None:
        try:
            await self.broker.requeue(delivery)
        except Exception as e:  # its lease runs out and it comes back anyway
            log.warning("could not put back %s (%s); it returns when its lease runs out", delivery.id, e)

    async def _drain(self) -> None:
        """Shutdown: put back what has not started; give running tasks the grace period."""
        waiting = self.threads.withdraw() if self.threads is not None else set()
        for held in list(self._held.values()):
            unstarted = held.state is None or (held.env is not None and held.env.id in waiting)
            if unstarted and held.task is not None:  # put back at once
                held.task.cancel()
                await self._put_back(held)
        running = [h.task for h in self._held.values() if h.task is not None]
        if running:
            all_done = asyncio.gather(*running, return_exceptions=True)
            now_wait = asyncio.create_task(self._now.wait())
            either: set[asyncio.Future[Any]] = {all_done, now_wait}
            await asyncio.wait(either, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
            now_wait.cancel()
        left = [h for h in self._held.values() if h.task is not None and not h.task.done()]
        if left:
            log.warning("grace period over: putting back %d unfinished task(s)", len(left))
            self._abandoned = True
            for held in left:
                if held.ctx is not None:
                    held.ctx.cancelled = True
                    cancel_async(held.ctx)
                if self.procs is not None and held.env is not None:
                    self.procs.cancel(held.env.id, "shutdown")
                assert held.task is not None
                held.task.cancel()
                await self._put_back(held)

    async def _put_back(self, held: _Held) -> None:
        try:
            # State first, as everywhere: once requeued, another worker may store STARTED, and a
            # late QUEUED would overwrite it.
            self.writer.forget(held.delivery.id)
            if held.state is not None:
                held.state.status = Status.QUEUED
                held.state.started_at = None
                await self.app._write_states([held.state])
            await self.broker.requeue(held.delivery)
        except Exception as e:  # the lease runs out and the message comes back anyway
            log.warning("could not put back %s (%s); it returns when its lease runs out", held.delivery.id, e)
        self._held.pop(held.delivery.id, None)

    # -- helpers running beside the fetch loop --------------------------------------------------
    async def _heartbeat(self) -> None:
        interval = max(min(self.broker.lease_s / 3, 10.0), 0.05)
        while True:
            await asyncio.sleep(interval)
            if self._held:
                try:
                    await self.broker.extend([h.delivery for h in self._held.values()])
                except Exception as e:
                    log.warning("lease heartbeat failed: %s", e)

    async def _listen_control(self) -> None:
        while True:
            try:
                async with self.store.subscribe(CONTROL_CHANNEL) as messages:
                    async for raw in messages:
                        self._on_control(raw)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("control channel lost (%s); resubscribing", e)
                await asyncio.sleep(1)

    def _on_control(self, raw: bytes) -> None:
        try:
            command = self.app.codec.loads(raw)
        except Exception:
            return
        task_id = command.get("cancel") if isinstance(command, dict) else None
        if not isinstance(task_id, str):
            return
        self._revoked[task_id] = None
        while len(self._revoked) > REVOKED_REMEMBERED:
            self._revoked.popitem(last=False)
        held = self._held.get(task_id)
        if held is not None and held.ctx is not None:
            log.info("cancelling %s", task_id)
            cancel_async(held.ctx)
            if self.procs is not None:
                self.procs.cancel(task_id)

    # -- one message ----------------------------------------------------------------------------
    async def _handle(self, held: _Held) -> None:
        d = held.delivery
        try:
            await self._process(held)
        except asyncio.CancelledError:
            pass  # shutdown: _drain put the message back
        except Exception as e:
            await self._after_internal_error(held, e)
        finally:
            if not self._abandoned:
                self._held.pop(d.id, None)
            self._space.set()

    async def _after_internal_error(self, held: _Held, error: Exception) -> None:
        """A fault of the worker (or of a hook, or of the store) while handling a message: put
        it back a few times, since a store or broker that failed may be back; then dead-letter
        it, so that a message which fails every time cannot keep the worker busy forever."""
        d = held.delivery
        seen = self._internal_errors.pop(d.id, 0) + 1
        if seen < INTERNAL_ERRORS_BEFORE_DEAD:
            self._internal_errors[d.id] = seen
            while len(self._internal_errors) > REVOKED_REMEMBERED:
                self._internal_errors.popitem(last=False)
            log.exception("internal error while handling message %s (%d of %d); putting it back", d.id, seen,
                          INTERNAL_ERRORS_BEFORE_DEAD)
            try:
                await self.broker.requeue(d, None, INTERNAL_ERROR_PAUSE_S)
            except Exception:
                pass  # its lease runs out and it comes back anyway
            return
        reason = f"{type(error).__name__}: {error}"
        log.exception("dead-lettered message %s after %d internal errors: %s", d.id, seen, reason)
        self.writer.forget(d.id)  # a STARTED still waiting must not land after FAILED
        try:
            if held.env is not None:
                state = TaskState(
                    id=held.env.id, name=held.env.name, status=Status.FAILED, attempts=held.env.attempt,
                    queued_at=dt.datetime.fromtimestamp(held.env.queued_at, dt.UTC), finished_at=_utcnow(),
                    error={"type": "InternalError", "message": f"the worker failed on it {seen} times: {reason}",
                           "traceback": ""},
                )
                await self.app._write_states([state])
            await self.broker.dead_letter(d, f"failed: InternalError: {reason}")
        except Exception as e:  # the lease runs out; the next delivery tries again
            log.warning("could not dead-letter %s (%s); it returns when its lease runs out", d.id, e)

    async def _process(self, held: _Held) -> None:
        d = held.delivery
        try:
            env = self.app.codec.decode(d.body)
        except SignatureError as e:
            log.error("dead-lettered message %s: %s", d.id, e)
            await self._store_rejection(
                d, "MessageRefused", f"the worker refused the message: {e} (the sender and the workers must share one secret)"
            )
            await self.broker.dead_letter(d, f"rejected: {e}")
            return
        except MessageError as e:
            log.error("dead-lettered malformed message %s: %s", d.id, e)
            await self._store_rejection(d, "MessageMalformed", f"the worker could not read the message: {e}")
            await self.broker.dead_letter(d, f"malformed: {e}")
            return
        task = self.app.tasks.get(env.name)
        if task is not None:
            env = env.with_defaults(
                task.opts.retries, task.opts.retry_backoff_s, task.opts.time_limit_s, task.opts.soft_time_limit_s,
                _relative_seconds(task.opts.expires),
            )
        held.env = env
        log.info("received %s[%s] attempt %d", env.name, env.id, env.attempt)
        state = TaskState(
            id=env.id, name=env.name, status=Status.STARTED, attempts=env.attempt,
            queued_at=dt.datetime.fromtimestamp(env.queued_at, dt.UTC),
            meta={k: v for k, v in env.headers.items() if k in ("owner", "parent")},
        )
        if env.id in self._revoked:
            await self._finish(held, state, Status.CANCELLED)
            return
        if _past_expiry(env):
            if not await self._admitted(held):
                return
            await self._expire(held, env, state)
            return
        if task is None:
            if not await self._admitted(held):
                return
            message = f"task {env.name!r} is not registered in this worker"
            log.error("dead-lettered %s: %s", env.id, message)
            state.status, state.finished_at = Status.FAILED, _utcnow()
            state.error = {"type": "NotRegistered", "message": message, "traceback": ""}
            await self.app._write_states([state])
            await self._run_outcome_hooks(env, state)
            await self.broker.dead_letter(d, f"failed: NotRegistered: {message}")
            return
        if self.app.admission_hooks and not await self._admitted(held):
            return  # before a hook spends anything on it
        for admit in self.app.admission_hooks:
            wait_s = await admit(env, task)
            if wait_s:
                log.debug("held back %s[%s] for %.2f s", env.name, env.id, wait_s)
                await self.broker.requeue(d, None, wait_s)
                return
        # Sync tasks of the thread pool go to the threads at once and wait there (see
        # ThreadRunner); the worker never leases more than `_capacity`, so they need no
        # semaphore of their own.
        places = self._slots if task.is_async or self.pool != "thread" else contextlib.nullcontext()
        async with places:
            assert self._stopping is not None
            if self._stopping.is_set():
                return  # shutdown began while this waited for a slot: _drain puts it back
            if env.id in self._revoked:
                await self._finish(held, state, Status.CANCELLED)
                return
            if not await self._admitted(held):
                return
            # Again, now: waiting for a slot, or held back by a hook, may have taken it past.
            if _past_expiry(env):
                await self._expire(held, env, state)
                return
            state.started_at = _utcnow()
            held.state = state
            held.ctx = TaskContext(env.id, env.name, env.attempt, dict(env.headers), self._progress_reporter(held), self._publisher())
            # A sync task of the thread pool may wait for a thread a while: said so, not "started".
            in_threads = not task.is_async and self.procs is None
            log.info("%s %s[%s]", "handed to the task threads" if in_threads else "started", env.name, env.id)
            started = time.perf_counter()
            job = Job(task, env, held.ctx)
            started_record = job.state_record = state.to_record()  # a snapshot: `state` changes later

            def started_bytes() -> bytes:
                return self.app.codec.dumps(started_record)

            if task.is_async:
                self.writer.put_later(env.id, started_bytes, STARTED_AFTER_S)
                outcome = await run_async(job)
            elif self.procs is not None:
                # The child writes progress itself; STARTED must be stored before it can.
                await self.writer.put(env.id, started_bytes())
                outcome = await self.procs.run(job)
            else:
                assert self.threads is not None

                def begun_bytes() -> bytes:
                    started_record["started_at"] = job.started_at
                    return started_bytes()

                # STARTED only once a thread has begun it, and then with that moment.
                self.writer.put_later(env.id, begun_bytes, STARTED_AFTER_S, ready=job.started)
                outcome = await self.threads.run(job)
                if job.started_at is not None:
                    state.started_at = dt.datetime.fromtimestamp(job.started_at, dt.UTC)
                    started = job.started_perf
            elapsed_ms = (time.perf_counter() - started) * 1000
            _keep_last_report(state, outcome.last_report or held.ctx.last_report, outcome.kind == "ok")
        if outcome.kind == "expired":  # it waited for a thread past its expiry, and never ran
            await self._expire(held, env, state)
            return
        if (held.ctx.cancelled and outcome.kind != "ok") or outcome.kind == "cancelled":
            if self._abandoned:
                return
            log.info("cancelled %s[%s] after %.1f ms", env.name, env.id, elapsed_ms)
            await self._finish(held, state, Status.CANCELLED)
            return
        await self._settle(held, env, state, outcome, elapsed_ms)

    async def _store_rejection(self, d: Delivery, error_type: str, message: str) -> None:
        """Store the task of a message refused or unreadable as FAILED, so that its sender
        (most often an app whose secret differs from this worker's) hears at once instead of
        waiting out every get().

        Nothing of the envelope is used: unverified or unreadable, it cannot be trusted. The id
        is the broker's (the one the sender's Result is keyed by); the name and owner come from
        the state the sender stored. Whoever can put a message under an id on the broker could
        already withhold or replace that very message: all this lets them add is a FAILED state
        for that id. And only a task still queued (or with no state yet: the sender's QUEUED
        write may come second, and then leaves this one be) is marked; one that started or
        ended keeps its state."""
        try:
            raw = await self.store.get_state(d.id)
            previous = None if raw is None else self.app.decode_state(raw)
            if previous is not None and previous.status is not Status.QUEUED:
                return
            state = TaskState(
                id=d.id, name=previous.name if previous else "?", status=Status.FAILED,
                queued_at=previous.queued_at if previous else None, finished_at=_utcnow(),
                meta=previous.meta if previous else {},
                error={"type": error_type, "message": message, "traceback": ""},
            )
            await self.app._write_states([state])
        except Exception as e:  # the dead letter matters more; the state stays as it was
            log.warning("could not store the failure of %s: %s", d.id, e)

    async def _expire(self, held: _Held, env: Envelope, state: TaskState) -> None:
        log.warning("expired %s[%s]: not started before its expiry", env.name, env.id)
        self.writer.forget(env.id)  # the STARTED of a task that never began
        state.status, state.started_at, state.finished_at = Status.EXPIRED, None, _utcnow()
        await self.app._write_states([state])
        await self._run_outcome_hooks(env, state)
        await self.broker.dead_letter(held.delivery, "expired: not started before its expiry time")

    async def _admitted(self, held: _Held) -> bool:
        """Wait for the broker's verdict on a message it handed out before its cancellation
        check came back (`Delivery.admitted`). False when the message is settled otherwise:
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
            await self.broker.ack([d])
        return False

    async def _finish(self, held: _Held, state: TaskState, status: Status) -> None:
        state.status, state.finished_at = status, _utcnow()
        if held.env is not None and self.app.outcome_hooks and held.env.headers:
            await self.writer.put(state.id, self.app.encode_state(state), final=True)
            await self._run_outcome_hooks(held.env, state)
            await self.broker.ack([held.delivery])
            return
        await self.writer.put(state.id, self.app.encode_state(state), ack=held.delivery, final=True)

    async def _settle(self, held: _Held, env: Envelope, state: TaskState, outcome: Outcome, elapsed_ms: float) -> None:
        d = held.delivery
        self.processed += 1
        state.finished_at = _utcnow()
        if outcome.kind == "ok":
            state.status, state.result = Status.SUCCEEDED, outcome.value
            try:
                encoded = self.app.encode_state(state)
            except SerializationError as e:
                state.result = None
                outcome = Outcome("error", exc_type="SerializationError", message=f"the task's return value cannot be stored: {e}")
            else:
                log.info("succeeded %s[%s] in %.1f ms", env.name, env.id, elapsed_ms)
                if self.app.outcome_hooks and env.headers:
                    await self.writer.put(env.id, encoded, final=True)
                    await self._run_outcome_hooks(env, state)
                    await self.broker.ack([d])
                else:
                    self.writer.put(env.id, encoded, ack=d, final=True)
                return
        state.error = outcome.error_record()
        retry_allowed = env.attempt <= (env.retries or 0)
        if retry_allowed and outcome.kind in ("error", "timeout", "retry", "lost"):
            delay = outcome.retry_countdown
            if delay is None:
                delay = backoff_delay(env.attempt, env.retry_backoff or 1.0)
            state.status, state.finished_at = Status.RETRYING, None
            state.message = f"retrying in {delay:.1f} s"
            log.info("retry %s[%s] in %.1f s (attempt %d of %d): %s: %s", env.name, env.id, delay, env.attempt,
                     (env.retries or 0) + 1, outcome.exc_type, outcome.message)
            await self.writer.put(env.id, self.app.encode_state(state))
            await self.broker.requeue(d, self.app.codec.encode(dataclasses.replace(env, attempt=env.attempt + 1)), delay)
            return
        if outcome.kind == "retry":
            state.error = {"type": "Retry", "message": f"no retries left after {env.attempt} attempt(s)", "traceback": ""}
        state.status = Status.FAILED
        log.warning("failed %s[%s] in %.1f ms: %s: %s", env.name, env.id, elapsed_ms, state.error["type"], state.error["message"])
        await self.writer.put(env.id, self.app.encode_state(state), final=True)
        if self.app.outcome_hooks and env.headers:
            await self._run_outcome_hooks(env, state)
        await self.broker.dead_letter(d, f"failed: {state.error['type']}: {state.error['message']}")

    async def _run_outcome_hooks(self, env: Envelope, state: TaskState) -> None:
        """Every final outcome of a message with headers (succeeded, failed, cancelled, expired,
        not registered) reaches the hooks: a workflow waits on each of its members."""
        if env.headers:
            await call_each(self.app.outcome_hooks, env, state)

    # -- what `current` calls -------------------------------------------------------------------
    def _progress_reporter(self, held: _Held) -> Any:
        loop = self._loop
        assert loop is not None  # tasks start only inside run()

        def report(fraction: float | None, message: str | None) -> None:
            def put() -> None:
                state = held.state
                if state is None or state.status is not Status.STARTED:
                    return
                state.progress, state.message = fraction, message
                self.writer.put(state.id, self.app.encode_state(state))

            if threading.get_ident() == self._loop_thread:
                put()
            else:
                loop.call_soon_threadsafe(put)

        return report

    def _publisher(self) -> Any:
        loop = self._loop
        assert loop is not None  # tasks start only inside run()

        def publish(channel: str, data: Any) -> None:
            if threading.get_ident() == self._loop_thread:
                loop.create_task(self.app.apublish(channel, data))
            else:
                asyncio.run_coroutine_threadsafe(self.app.apublish(channel, data), loop).result()

        return publish


def _connect_pause(attempt: int) -> float:
    """Seconds before connection attempt ``attempt + 1``: doubling from CONNECT_RETRY_FIRST_S to
    CONNECT_RETRY_MAX_S, each spread by +-25 %."""
    ceiling = min(CONNECT_RETRY_FIRST_S * 2.0 ** min(attempt - 1, 32), CONNECT_RETRY_MAX_S)
    return ceiling * random.uniform(0.75, 1.25)


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


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


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
