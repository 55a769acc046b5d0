"""`Offload`: configuration, the task registry, sending, results and pub/sub."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import logging
import os
import sys
import threading
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from offload import forks, history, hooks, ratelimit, scheduler
from offload import workflow as workflows
from offload.brokers import Backends, check_stores_results, check_url, make_direct, open_backends
from offload.brokers.base import DEFAULT_HEARTBEAT_TIMEOUT_S, Broker, Direct, Store
from offload.brokers.states import StateRow
from offload.channels import CONTROL_CHANNEL, check_channel_name
from offload.config import BrokerURL, absolute_sqlite, parse_url
from offload.errors import ConfigError, MessageError
from offload.message import Codec, Envelope
from offload.portal import Portal
from offload.result import Result, Status, TaskState
from offload.sending import Sender
from offload.serializers import get_serializer
from offload.task import AsyncTask, Options, Task, TaskDecorator, TaskRef, task_name
from offload.workers import WorkerInfo, live_workers

if TYPE_CHECKING:
    from offload.scheduler import Periodic
    from offload.worker.outcome import Outcome

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("offload")

DEFAULT_URL = "sqlite:///offload.db"  # beside the module that creates the app: see default_base_dir
def default_base_dir() -> str:
    """The directory of the module whose code creates the app (the first caller outside this
    package), or the working directory for code without a file (a REPL, ``python -c``)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "offload":
        frame = frame.f_back
    filename = frame.f_globals.get("__file__") if frame is not None else None
    if isinstance(filename, str) and os.path.exists(filename):
        return os.path.dirname(os.path.abspath(filename))
    return os.getcwd()


class Offload:
    """One application: a broker URL, a namespace, and the tasks registered on it.

    ``Offload()`` reads ``$OFFLOAD_URL`` (default ``sqlite:///offload.db``) and
    ``$OFFLOAD_NAMESPACE`` (default ``"default"``) once, here.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        results: str | None = None,
        serializer: str = "json",
        secret: str | bytes | None = None,
        timezone: str = "UTC",
        result_ttl: float | dt.timedelta = dt.timedelta(days=1),
        compress_over: int = 8192,
        debug: bool = False,
        heartbeat_timeout: float | dt.timedelta = dt.timedelta(seconds=DEFAULT_HEARTBEAT_TIMEOUT_S),
    ) -> None:
        given = url or os.environ.get("OFFLOAD_URL")
        # The default database lives beside the code that creates the app, so that a web process
        # and a worker of one project meet whatever their working directories; a relative path
        # given explicitly is the working directory's, as a path on the command line would be.
        base_dir = os.getcwd() if given else default_base_dir()
        self.url: BrokerURL = absolute_sqlite(parse_url(given or DEFAULT_URL), base_dir)
        self.namespace = namespace or os.environ.get("OFFLOAD_NAMESPACE") or "default"
        if not self.namespace.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"namespace must be letters, digits, '-', '_' or '.', got {self.namespace!r}")
        results = results or os.environ.get("OFFLOAD_RESULTS")
        self.results_url: BrokerURL = absolute_sqlite(parse_url(results), os.getcwd()) if results else self.url
        check_url(self.url)
        if self.results_url is not self.url:
            check_url(self.results_url)
        check_stores_results(self.results_url)
        if isinstance(secret, str):
            secret = secret.encode()
        self.secret: bytes | None = secret
        self.codec = Codec(get_serializer(serializer), secret=secret, compress_over=compress_over)
        self.timezone = timezone
        self.result_ttl_s = result_ttl.total_seconds() if isinstance(result_ttl, dt.timedelta) else float(result_ttl)
        self.debug = debug
        self.heartbeat_timeout_s = (heartbeat_timeout.total_seconds() if isinstance(heartbeat_timeout, dt.timedelta)
                                    else float(heartbeat_timeout))
        if self.heartbeat_timeout_s <= 0:
            raise ConfigError(f"heartbeat_timeout must be positive, got {self.heartbeat_timeout_s:g} s")
        self.registry: dict[str, Task[Any, Any]] = {}
        self.worker_start_hooks: list[Callable[[], Any]] = []
        self.periodic_tasks: list[Periodic] = []
        #: "module:attribute" this app was loaded from (set by offload.loading; process pools need it).
        self.spec: str | None = None
        #: Called by the worker after a final outcome of a message with headers is stored and
        #: before it is acknowledged: (envelope, state); also by `_cancel` for a queued message
        #: it removes (its envelope then carries only the ``parent`` header). Workflows hang on this.
        self.outcome_hooks: list[Callable[[Envelope, TaskState], Any]] = []
        #: Asked by the worker before a task starts: (envelope, task) -> seconds to wait, or None
        #: to run now. A positive answer puts the message back with that delay, costing no
        #: attempt (rate limits hang on this).
        self.admission_hooks: list[Callable[[Envelope, Task[Any, Any]], Awaitable[float | None]]] = []
        #: Called with each envelope built for sending (`delay()`, `adelay()`, a workflow's
        #: steps), before it is encoded: a hook may add headers. An error raised fails the send.
        self.send_hooks: list[Callable[[Envelope], None]] = []
        #: Entered by the worker, in order, around a task's run and its settlement (outcome hooks
        #: included): (envelope) -> a context manager whose value is called with the run's
        #: outcome once it ends (not at all for a message that never ran). Tracing hangs on this.
        self.run_wrappers: list[Callable[[Envelope], AbstractContextManager[Callable[[Outcome], None]]]] = []
        # Every app carries the workflow hook: a worker must move on a workflow whose members
        # it runs even when its own code never builds one. Messages without headers skip it.
        self.outcome_hooks.append(functools.partial(workflows.on_outcome, self))
        self._portal = Portal()
        self.sending = Sender(self)
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Backends] = weakref.WeakKeyDictionary()
        self._connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        # The sync face's blocking client (None until asked for; False when the backend has none).
        self._direct_client: Direct | Literal[False] | None = None
        self._direct_lock = threading.Lock()
        forks.after_fork(self._after_fork)

    def _after_fork(self) -> None:
        # What the parent made is the parent's: dropped here, never closed (closing would
        # disturb the parent's connections).
        self._by_loop.clear()
        self._connecting.clear()
        self._direct_lock = threading.Lock()
        self._direct_client = None

    def __repr__(self) -> str:
        return f"<Offload {self.url.masked} namespace={self.namespace!r}>"

    # -- registry ----------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, *, name: str | None = None, **options: Any) -> TaskDecorator: ...
    def task(self, *args: Any, **options: Any) -> Any:
        """Register a function (sync or ``async def``) as a task: ``@app.task`` or ``@app.task(queue=...)``."""
        if len(args) > 1:
            raise ConfigError("app.task takes one function; give its options by keyword")
        fn = args[0] if args else None
        name: str | None = options.pop("name", None)
        opts = Options().merge(**options)

        def register(f: Callable[P, Any]) -> Task[P, Any]:
            task_name_ = name or task_name(f)
            existing = self.registry.get(task_name_)
            if existing is not None and existing.fn is not f and getattr(existing.fn, "__code__", None) is not getattr(f, "__code__", None):
                raise ConfigError(f"two different functions registered as task {task_name_!r}; give one of them name=...")
            if opts.rate_limit is not None:
                ratelimit.parse_rate(opts.rate_limit)  # a bad one fails here, at decoration time
                ratelimit.install(self)
            t: Task[P, Any] = (AsyncTask if inspect.iscoroutinefunction(f) else Task)(self, f, task_name_, opts)
            self.registry[task_name_] = t
            return t

        return register(fn) if fn is not None else register

    def ref(self, name: str) -> TaskRef:
        """A task by name, without importing its code (web and workers on different machines)."""
        return TaskRef(self, name, self._default_options(name))

    def _default_options(self, name: str) -> Options:
        t = self.registry.get(name)
        return t.opts if t is not None else Options()

    def send(self, name: str, *args: Any, **kwargs: Any) -> Result[Any]:
        return self.ref(name).delay(*args, **kwargs)

    async def asend(self, name: str, *args: Any, **kwargs: Any) -> Result[Any]:
        return await self.ref(name).adelay(*args, **kwargs)

    def result(self, task_id: str) -> Result[Any]:
        return Result(self, task_id)

    def workflow(self, workflow_id: str) -> workflows.WorkflowResult:
        """A workflow's handle from its id, in any process: like `result` (which also works for
        a workflow id), plus ``get(return_exceptions=True)``, ``children()`` and a ``cancel()``
        that reaches every member."""
        return workflows.WorkflowResult(self, workflow_id)

    def periodic(self, schedule: Any, *, name: str | None = None, catch_up: bool = False,
                 **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
        """``@app.periodic(cron("0 3 * * *"))`` or ``@app.periodic(every(minutes=2))``: register
        the function as a task (with ``options`` such as ``queue=``) that `offload beat` enqueues
        when due. ``catch_up=True`` enqueues the runs missed while no beat was running."""
        return scheduler.register(self, schedule, name=name, catch_up=catch_up, options=options)

    def on_worker_start(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``fn`` once in each worker process before its first task (fill ``current.state``)."""
        self.worker_start_hooks.append(fn)
        return fn

    def workers(self) -> list[WorkerInfo]:
        """The live workers of this namespace (heard from within ``heartbeat_timeout``)."""
        return self._portal.run(self.aworkers())

    async def aworkers(self) -> list[WorkerInfo]:
        return await live_workers(await self._store())

    def tasks(self, status: Status | str | None = None, name: str | None = None, queue: str | None = None,
              limit: int = 100, before: dt.datetime | float | None = None) -> list[TaskState]:
        """The stored task states, newest queued first: those with this status, task name and
        queue (each filter when given), queued before ``before``; ``limit`` at most. Pass the
        last one's ``queued_at`` as ``before`` for the next page. From the result store, so it
        survives restarts of everything but the store, and keeps each state ``result_ttl``."""
        return self._portal.run(self.atasks(status, name, queue, limit, before))

    async def atasks(self, status: Status | str | None = None, name: str | None = None, queue: str | None = None,
                     limit: int = 100, before: dt.datetime | float | None = None) -> list[TaskState]:
        return await history.list_tasks(self, history.query(status, name, queue, limit, before))

    def asgi(self, **options: Any) -> Any:
        """The browser gateway (long polling, SSE, channels, offload.js, metrics) as an ASGI
        app, mountable under any prefix. Options: see `offload.gateway.create_gateway`."""
        from offload.gateway import create_gateway  # the gateway's extra (Starlette) is optional

        return create_gateway(self, **options)

    # -- connections, one set per event loop ---------------------------------------------------
    async def _backends(self) -> Backends:
        forks.check()
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is not None:
            return found
        lock = self._connecting.setdefault(loop, asyncio.Lock())
        async with lock:
            found = self._by_loop.get(loop)
            if found is None:
                found = self._by_loop[loop] = await open_backends(self.url, self.results_url, self.namespace, self.heartbeat_timeout_s)
        return found

    async def _broker(self) -> Broker:
        return (await self._backends()).broker

    async def _store(self) -> Store:
        return (await self._backends()).store

    async def aclose(self) -> None:
        """Close this loop's connections."""
        found = self._by_loop.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.close()

    def close(self) -> None:
        """Close the connections of the sync face and stop its thread."""
        direct, self._direct_client = self._direct_client, None
        if isinstance(direct, Direct):
            direct.close()
        if self._portal._loop is not None:
            self._portal.run(self.aclose())
            self._portal.stop()

    # -- states ------------------------------------------------------------------------------
    def encode_state(self, state: TaskState) -> bytes:
        return self.codec.dumps(state.to_record())

    def state_row(self, state: TaskState) -> StateRow:
        """The state encoded for a store, with what its history files it under."""
        return StateRow(state.id, self.encode_state(state), history.listing(state))

    def decode_state(self, data: bytes) -> TaskState:
        try:
            return TaskState.from_record(self.codec.loads(data))
        except MessageError:
            raise
        except Exception as e:
            raise MessageError(f"undecodable task state: {e}") from None

    async def _read_states(self, ids: Sequence[str]) -> list[TaskState | None]:
        store = await self._store()
        return [None if raw is None else self.decode_state(raw) for raw in await store.get_states(ids)]

    async def _read_state(self, task_id: str) -> TaskState | None:
        return (await self._read_states([task_id]))[0]

    async def _write_states(self, states: Sequence[TaskState]) -> None:
        store = await self._store()
        final = {s.id for s in states if s.done}
        await store.put_states([self.state_row(s) for s in states], self.result_ttl_s, final)

    def _direct(self) -> Direct | None:
        """The result store's blocking face for sync calls, if it has one (kept in
        ``_direct_client``: None until made, False when there is none). It is made once the
        loop-side backends have connected, so an unreachable server fails as usual."""
        forks.check()
        if self._direct_client is None:
            self._portal.run(self._backends())
            with self._direct_lock:
                if self._direct_client is None:
                    self._direct_client = make_direct(self.results_url, self.namespace) or False
        return self._direct_client or None

    # -- sending: the routes live in offload.sending ------------------------------------------
    def build(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], opts: Options, task_id: str | None = None) -> Envelope:
        return self.sending.build(name, args, kwargs, opts, task_id)

    async def enqueue_envelope(self, env: Envelope) -> Result[Any]:
        return await self.sending.enqueue_envelope(env)

    async def _cancel(self, task_id: str) -> None:
        backends = await self._backends()
        if await backends.broker.cancel(task_id):
            state = await self._read_state(task_id)
            if state is not None and not state.done:
                state.status = Status.CANCELLED
                state.finished_at = dt.datetime.now(dt.UTC)
                await self._write_states([state])
                # Its message never reaches a worker now, so the outcome hooks run here (a
                # workflow waiting for this member must learn that it ended).
                if state.meta.get("parent"):
                    env = Envelope(id=task_id, name=state.name, headers={"parent": state.meta["parent"]})
                    await hooks.call_each(self.outcome_hooks, env, state)
        # A running (or already fetched) task is stopped by its worker.
        await backends.store.publish(CONTROL_CHANNEL, self.codec.dumps({"cancel": task_id}))

    # -- pub/sub -----------------------------------------------------------------------------
    async def apublish(self, channel: str, data: Any) -> None:
        await (await self._store()).publish(check_channel_name(channel), self.codec.dumps(data))

    def publish(self, channel: str, data: Any) -> None:
        self._portal.run(self.apublish(channel, data))

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Any]]:
        """``async with app.subscribe("news") as sub: async for data in sub: ...``"""
        check_channel_name(channel)
        store = await self._store()
        async with store.subscribe(channel) as raw:

            async def decoded() -> AsyncIterator[Any]:
                async for data in raw:
                    # Anyone who can publish on the store can send bytes here: one that does not
                    # decode (or, with pickle, is not signed) is dropped, not raised, so it
                    # cannot end every subscriber's loop.
                    try:
                        value = self.codec.loads(data)
                    except Exception as e:
                        log.warning("dropped an undecodable message on channel %r: %s", channel, e)
                        continue
                    yield value

            yield decoded()
