"""The worker: lease messages, hand each to the pipeline, keep the leases alive, stop well.

The fetch loop owns the worker's places: it claims as many messages as it has room for (or
takes what the writer's refill claimed with a batch of acks) and starts one `Pipeline.process`
per message. A heartbeat renews the leases of everything this worker holds, so a long task is
never handed to a second worker while this one lives; when the worker dies, the leases run out
and the messages are delivered again (at least once).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

from offload.app import Offload
from offload.brokers.base import Broker, Delivery, Store
from offload.channels import CONTROL_CHANNEL
from offload.errors import ConfigError, UsageError
from offload.hooks import call_each
from offload.loops import loop_kind
from offload.retrying import Backoff
from offload.worker.connect import connect, connect_budget, pause_unless_stopped
from offload.worker.executors import ThreadRunner, cancel_async
from offload.worker.heap import freeze_startup_heap
from offload.worker.heartbeat import Heartbeat
from offload.worker.metrics import WorkerMetrics
from offload.worker.pipeline import Held, Pipeline, Pool
from offload.worker.places import Places, Refill
from offload.worker.process_pool import ProcessRunner
from offload.worker.settle import Settle
from offload.worker.writer import StateWriter
from offload.workers import Registration

log = logging.getLogger("offload.worker")

# How long one fetch waits for a message. Brokers wake a waiting fetch the moment a message
# arrives, so this only bounds how soon an idle worker notices a stop request.
FETCH_WAIT_S = 0.5
BURST_FETCH_WAIT_S = 0.25
# A burst worker with nothing ready still stays while a scheduled message of its queues comes
# due this soon: a retry it has just scheduled (a short countdown, a first backoff of at most
# 1 s by default) is part of its work, not a task for the next run.
BURST_HORIZON_S = 1.0
REVOKED_REMEMBERED = 10_000
# After a failed fetch: 0.4, 0.8, 1.6, 3.2, then 5 s until one succeeds.
FETCH_BACKOFF = Backoff(first_s=0.4, cap_s=5.0)


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
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
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
        #: Serve this worker's Prometheus metrics (`worker.metrics`) on this port; None: none.
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self._held: dict[str, Held] = {}
        self._revoked: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Events and the loop belong to run(): they are created on the worker's own loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._abandoned = False
        self._serving = False  # connected: past the wait for the broker
        self._signals_seen = 0
        self._settle: Settle | None = None  # made by run(), with the connections
        self._metrics: WorkerMetrics | None = None

    @property
    def processed(self) -> int:
        """How many task attempts ran to an outcome (succeeded, failed or retried)."""
        return 0 if self._settle is None else self._settle.processed

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
        self._places.changed.set()

    async def run(self, on_ready: Callable[[], Any] | None = None) -> int:
        """Serve until stopped (or, in burst mode, until the queues are empty). Returns an exit code.

        A broker (or result store) that cannot be reached is tried again with backoff, a warning
        each time, for up to ``connect_timeout_s``; then `BrokerUnavailable` is raised. A stop
        while it waits returns 0 at once. ``on_ready`` is called once the worker is connected
        and ready, before it takes its first task."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._now = asyncio.Event()
        self._places = Places(self.concurrency + self.prefetch, self._held)
        self._slots = asyncio.Semaphore(self.concurrency)
        # Before connecting: a stop must work while the worker waits for its broker.
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._request_stop)
        try:
            backends = await connect(self.app, self._stopping, connect_budget(self.connect_timeout_s, self.burst))
            if backends is None:
                log.info("worker stopped before it could reach the broker")
                return 0
            self.broker: Broker = backends.broker
            self.store: Store = backends.store
            self._serving = True
            return await self._serve(on_ready)
        finally:
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(sig)

    async def _serve(self, on_ready: Callable[[], Any] | None) -> int:
        assert self._loop is not None and self._stopping is not None
        # First: a port that cannot be served stops the worker before it starts threads or children.
        self._metrics = metrics = WorkerMetrics() if self.metrics_port is not None else None
        try:
            exporter = metrics.serve(self.metrics_host, self.metrics_port or 0) if metrics is not None else None
        except OSError as e:
            raise ConfigError(f"cannot serve the worker's metrics on {self.metrics_host}:{self.metrics_port}: {e}") from None
        if exporter is not None:
            log.info("worker metrics on http://%s:%d/metrics", exporter.host, exporter.port)
        self.broker.hands_out_early = True  # the pipeline awaits each message's admission
        self._refill = Refill(self._places, self.queues, self.broker, self._stopping)
        # The writer asks for refills only where the broker can do them with this store.
        self.writer = StateWriter(self.store, self.broker, self.app.result_ttl_s, self._refill)
        # With the async pool, a sync task still needs somewhere to run that is not the loop.
        self.threads = ThreadRunner(self.concurrency if self.pool == "thread" else 8) if self.pool != "process" else None
        self.procs: ProcessRunner | None = None
        await call_each(self.app.worker_start_hooks)
        if self.pool == "process":
            assert self.app.spec is not None
            self.procs = ProcessRunner(self.app.spec, self.concurrency, self.max_tasks_per_child)
            await self.procs.start()
        if self.handle_signals:
            freeze_startup_heap()
        registration = Registration(self.store, queues=self.queues, concurrency=self.concurrency, pool=self.pool,
                                    timeout_s=self.broker.lease_s)
        self.heartbeat = Heartbeat(self.broker, registration, lambda: [h.delivery for h in self._held.values()])
        await self.heartbeat.start()
        log.info(
            "worker ready: %s namespace=%s queues=%s pool=%s concurrency=%d loop=%s",
            self.app.url.masked, self.app.namespace, ",".join(self.queues), self.pool, self.concurrency,
            loop_kind(asyncio.get_running_loop()),
        )
        self._settle = settle = Settle(self.app, self.broker, self.store, self.writer, metrics)
        self.pipeline = Pipeline(
            self.app, self.broker, self.writer, settle, pool=self.pool, threads=self.threads, procs=self.procs,
            slots=self._slots, stopping=self._stopping, revoked=self._revoked, heartbeat=self.heartbeat,
        )
        if on_ready is not None:
            on_ready()
        helpers = [asyncio.create_task(self.heartbeat.run()), asyncio.create_task(self._listen_control())]
        try:
            await self._fetch_loop()
            await self._drain()
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.writer.flush()
            await self.heartbeat.leave()
            if exporter is not None:
                exporter.close()
            await self._refill.close()
            if self.threads is not None:
                self.threads.close()
            if self.procs is not None:
                await self.procs.close()
        log.info("worker stopped after %d task(s)", self.processed)
        return 0

    async def _fetch_loop(self) -> None:
        assert self._stopping is not None
        places = self._places
        pauses: Iterator[float] | None = None  # the backoff, while fetches fail
        while not self._stopping.is_set():
            refilled = self._refill.take()
            if refilled:
                self._start(refilled)
                await asyncio.sleep(0)  # let them start (up to their first wait) before looking again
                continue
            free = places.free()
            # Claim when at least half the places are free (or all, when idle), so that one
            # round trip to the broker serves several tasks instead of one. While the queues
            # have a backlog and the writer has a batch to write, the batch claims instead (a
            # refill with its acks: see Refill).
            if (
                free <= 0
                or (self._held and free < (places.capacity + 1) // 2)
                or (self.writer.refilling and self._refill.more_ready())
            ):
                places.changed.clear()
                await places.changed.wait()  # set when a message is let go, a refill is back, and on stop
                continue
            places.reserved += free
            try:
                deliveries = await self.broker.fetch(self.queues, free, BURST_FETCH_WAIT_S if self.burst else FETCH_WAIT_S)
                pauses = None
            except Exception as e:
                if pauses is None:
                    pauses = FETCH_BACKOFF.pauses()
                pause = next(pauses)
                log.warning("fetch failed (%s); retrying in %.1f s", e, pause)
                await pause_unless_stopped(pause, self._stopping)
                continue
            finally:
                places.reserved -= free
            places.backlog = len(deliveries) == free
            self._start(deliveries)
            if deliveries:
                # Let the new tasks start (up to their first wait) before the next fetch goes out.
                await asyncio.sleep(0)
            if self.burst and not deliveries and self._idle() and not await self._due_soon() and self._idle():
                break
        self._refill.put_back_untaken()

    def _idle(self) -> bool:
        return not self._held and not self._refill.pending

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
            held = self._held[d.id] = Held(d)
            held.task = asyncio.create_task(self._handle(held))
        if self._metrics is not None:
            self._metrics.set_running(len(self._held))

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
                held.put_back = True
                if held.ctx is not None:
                    held.ctx.cancelled = True
                    cancel_async(held.ctx)
                if self.procs is not None and held.env is not None:
                    self.procs.cancel(held.env.id, "shutdown")
                assert held.task is not None
                held.task.cancel()
                await self._put_back(held)

    async def _put_back(self, held: Held) -> None:
        assert self._settle is not None
        await self._settle.put_back(held.delivery, held.state)
        self._held.pop(held.delivery.id, None)

    # -- helpers running beside the fetch loop --------------------------------------------------
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
    async def _handle(self, held: Held) -> None:
        """The task of one message: the pipeline, then its place freed for the fetch loop."""
        d = held.delivery
        try:
            await self.pipeline.process(held)
        except asyncio.CancelledError:
            pass  # shutdown: _drain put the message back
        except Exception as e:
            assert self._settle is not None
            await self._settle.after_internal_error(d, held.env, e)
        finally:
            if not self._abandoned:
                self._held.pop(d.id, None)
            self.heartbeat.forget(d.id)
            if self._metrics is not None:
                self._metrics.set_running(len(self._held))
            self._places.changed.set()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
