"""How a task call reaches the broker, and its QUEUED state the result store.

Every send builds an `Envelope` (`Sender.build`), encodes it (a value the serializer cannot
carry fails there, before anything is sent), then takes one of these routes:

===============================  =================================================  ==========================
the call                          route                                              round trips waited for
===============================  =================================================  ==========================
any, broker is its own store      one enqueue that writes the message and its state  one (the broker's)
(redis, sqlite, memory)           together (`Broker.writes_initial_state`)
async, separate store (amqp)      the enqueue and a write-if-absent of the state,    the longer of the two
                                  concurrently (`_send_beside_state`)
async, with a dedup ``key``       the state first, then the enqueue: the message     two, one after the other
                                  may not be sent at all when the key is held
sync ``delay()``, broker is its   the store's blocking face sends from the caller's  one, no loop hop
own store with a `Direct` face    thread (`Direct.enqueue`)
any other sync call               the async route, run on the app's portal loop      as the async route
===============================  =================================================  ==========================

A keyed send whose key is held by a task that has just finished (its final state is stored a
moment before its ack releases the key) is retried briefly, so a caller who saw it finish does
not get the finished task back (`_wait_for_finished_holder`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from offload.brokers.base import Broker, OutgoingMessage, Store
from offload.brokers.states import StateRow
from offload.message import Envelope, new_task_id
from offload.result import Result, Status, TaskState
from offload.task import Options

if TYPE_CHECKING:
    from offload.app import Offload

#: How long a delay() with a key waits for a finished holder to release it (about 1 s in all).
KEY_RELEASE_PAUSES_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.3)


class Sender:
    """The routes above, for one app."""

    def __init__(self, app: Offload) -> None:
        self.app = app

    def build(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], opts: Options, task_id: str | None = None) -> Envelope:
        now = time.time()
        eta: float | None = None
        if opts.countdown_s is not None:
            eta = now + opts.countdown_s
        elif opts.eta is not None:
            eta = opts.eta.timestamp()
        expires: float | None = None
        if isinstance(opts.expires, dt.datetime):
            expires = opts.expires.timestamp()
        elif isinstance(opts.expires, dt.timedelta):
            expires = now + opts.expires.total_seconds()
        elif opts.expires is not None:
            expires = now + float(opts.expires)
        # Send what this process knows: everything for a task registered here, only the options
        # given explicitly for a task known by name. The worker fills in the rest.
        known = name in self.app.registry

        def pick(option: str, value: Any) -> Any:
            return value if known or option in opts.given else None

        env = Envelope(
            id=task_id or new_task_id(), name=name, args=tuple(args), kwargs=dict(kwargs), queue=opts.queue,
            priority=opts.priority, eta=eta, expires=pick("expires", expires), retries=pick("retries", opts.retries),
            retry_backoff=pick("retry_backoff", opts.retry_backoff_s), time_limit=pick("time_limit", opts.time_limit_s),
            soft_time_limit=pick("soft_time_limit", opts.soft_time_limit_s), key=opts.key, queued_at=now,
            headers=dict(opts.headers),
        )
        for hook in self.app.send_hooks:
            hook(env)
        return env

    async def enqueue(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], opts: Options, task_id: str | None = None) -> Result[Any]:
        """`adelay()`: build and send on the running loop."""
        return await self.enqueue_envelope(self.build(name, args, kwargs, opts, task_id))

    def outgoing(self, env: Envelope, with_state: bool) -> tuple[OutgoingMessage, StateRow]:
        """The message for an envelope and its encoded QUEUED state, carried by the message
        when ``with_state`` (a broker that is its own store writes both in one step)."""
        app = self.app
        body = app.codec.encode(env)  # first: what cannot be encoded fails before anything is sent
        queued = TaskState(
            id=env.id, name=env.name, status=Status.QUEUED, queue=env.queue,
            queued_at=dt.datetime.fromtimestamp(env.queued_at, dt.UTC),
            meta=env.state_meta(),
        )
        state = app.state_row(queued)
        message = OutgoingMessage(
            id=env.id, queue=env.queue, body=body, priority=env.priority, eta=env.eta, key=env.key, expires=env.expires,
            state=state.data if with_state else None, state_ttl_s=app.result_ttl_s if with_state else None,
            state_listing=state.listing if with_state else None,
        )
        return message, state

    async def enqueue_envelope(self, env: Envelope) -> Result[Any]:
        app = self.app
        backends = await app._backends()
        with_state = backends.broker.writes_initial_state and app.results_url is app.url
        message, state = self.outgoing(env, with_state)
        if with_state:
            holder = await backends.broker.enqueue(message)
        elif env.key is None:
            holder = await self._send_beside_state(backends.broker, backends.store, message, state)
        else:
            # A keyed message may not be sent at all (its key is held by another): its state
            # is written first, then the message.
            await backends.store.put_states([state], app.result_ttl_s)
            holder = await backends.broker.enqueue(message)
        if holder != env.id:
            holder = await self._wait_for_finished_holder(backends.broker, message, holder)
        return Result(app, holder, sent_here=holder == env.id)

    async def _send_beside_state(self, broker: Broker, store: Store, message: OutgoingMessage, state: StateRow) -> str:
        """Send the message and store its QUEUED state at the same time: the send does not wait
        for a second server. The state is written only where none is stored, so the final state
        of a worker that was quicker than the write stays."""
        write = asyncio.ensure_future(_after_one_turn(store.put_states_if_absent([state], self.app.result_ttl_s)))
        try:
            holder = await broker.enqueue(message)
        except BaseException:
            # The send's error is the one to report; the write's, if any, is dropped with it.
            write.add_done_callback(_drop_outcome)
            raise
        try:
            await write
        except Exception as e:
            e.add_note(f"task {message.id} was sent all the same; only its QUEUED state is missing")
            raise
        return holder

    def send_sync(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], opts: Options) -> Result[Any]:
        """`delay()`: straight from the caller's thread when the backend allows, else via the loop."""
        app = self.app
        env = self.build(name, args, kwargs, opts)
        if env.key is None:
            direct = app._direct() if app.results_url is app.url else None
            if direct is not None:
                message, _ = self.outgoing(env, with_state=True)
                direct.enqueue(message)
                return Result(app, env.id, sent_here=True)
        return app._portal.run(self.enqueue_envelope(env))

    async def _wait_for_finished_holder(self, broker: Broker, message: OutgoingMessage, holder: str) -> str:
        for pause in KEY_RELEASE_PAUSES_S:
            state = await self.app._read_state(holder)
            if state is None or not state.done:
                return holder
            await asyncio.sleep(pause)
            holder = await broker.enqueue(message)
            if holder == message.id:
                break
        return holder


async def _after_one_turn(write: Awaitable[None]) -> None:
    """Wait one turn of the loop, then ``write``. A client that sends from a writer task of its
    own (aiormq) queues the message in the send's first step, and its writer is woken behind
    this task: without the turn, the state's round trip to the store goes out first and the
    message waits for its system call."""
    await asyncio.sleep(0)
    await write


def _drop_outcome(future: asyncio.Future[Any]) -> None:
    """Done callback that retrieves a future's error, so that nobody is told it went unread."""
    if not future.cancelled():
        future.exception()
