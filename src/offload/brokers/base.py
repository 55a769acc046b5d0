"""The two protocols every backend implements: `Broker` (queues) and `Store` (results, events,
pub/sub channels and a small key-value space for locks and counters).

Both speak bytes: the codec in `offload.message` turns envelopes and values into bytes before
they reach a backend, so a backend never imports a serializer. Every method is a coroutine and
must not block the event loop. A backend module is the only place that imports its client
library; everything else (worker, gateway, workflows, scheduler) speaks these protocols only.

Every Broker keeps the same state machine for each message (tests/brokers/test_protocol.py
checks it rule by rule on every kind)::

    enqueue ───────────▶ ready ◀──── its time comes ──── delayed ◀── enqueue with an eta
                           │   ▲                                ▲
         fetch: claim and  │   │ requeue,                       │ requeue with delay_s > 0
         lease in one step │   │ or the lease runs out          │
         (a new receipt)   ▼   │                                │
                          leased ───────────────────────────────┘
                           ├── extend: leased for lease_s more, from now
                           ├── ack: gone
                           └── dead_letter(reason): a dead letter, its reason and exact bytes kept

Guarantees a Broker gives:

* at least once: a fetched message is leased for ``lease_s`` seconds; until `ack` it is not
  handed to anyone else, and when its lease runs out (its worker died) the next claim takes it
  back by itself, with ``deliveries`` incremented;
* claim and lease happen in one atomic step, so two consumers never get the same message;
* a lease belongs to its delivery's ``receipt``: once the message has been claimed again, an
  `ack`, `requeue`, `extend` or `dead_letter` carrying the old receipt changes nothing (a
  delivery whose receipt is None is not checked);
* a message with an ``eta`` (or requeued with a delay) is not visible before it, and never
  waits inside a lease;
* a fetch from several queues takes the highest ``priority`` (0..9) first, at equal priority
  the queues in the order given, then FIFO;
* a ``key`` (deduplication) is held from `enqueue` through every requeue until `ack` or
  `dead_letter` of that message; meanwhile an `enqueue` with it stores nothing;
* a dead letter keeps its reason and the body's exact bytes.

RabbitMQ has no leases: it holds a delivery until its ack or until its channel closes, and
redelivers it then.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import math
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from offload.brokers.states import HistoryQuery, Listing, StateRow, state_rows
from offload.config import BrokerURL

#: How long a worker may go unheard before it counts as dead: its registry record expires, and
#: the leases of the messages it holds (renewed every third of it) run out, so its tasks go back
#: to their queue. `Offload(heartbeat_timeout=...)` or a URL's ``visibility_timeout`` changes it.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
#: Where a store that keeps its worker registry in its key-value space puts the records (the
#: space's other keys are `offload.ratelimit`'s and the workflows', none of them under it).
WORKER_PREFIX = "worker:"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message on its way into a queue. ``body`` is the encoded envelope."""

    id: str
    queue: str
    body: bytes
    priority: int = 0
    eta: float | None = None  # epoch seconds; None means now
    key: str | None = None  # deduplication key
    expires: float | None = None  # epoch seconds; a hint for brokers with native expiry
    # The task's first state, for a broker that `writes_initial_state`: stored under the id in
    # the same step as the message, before it can be fetched (never for a dedup loser).
    state: bytes | None = None
    state_ttl_s: float | None = None
    state_listing: Listing | None = None


@dataclass(slots=True)
class Delivery:
    """A leased message. ``receipt`` is the backend's own handle (a lease token, a delivery tag)."""

    id: str
    queue: str
    body: bytes
    deliveries: int = 1  # how many times it was handed out, this time included
    receipt: Any = None
    # When set, the broker's check that no cancel got to the message first is still on its way
    # (it overlaps with the worker's preparations; see `Broker.hands_out_early`). The worker
    # awaits it before the message has any effect: a state written, a task run.
    admitted: asyncio.Future[Verdict] | None = None


class Verdict(enum.Enum):
    """The outcome of a broker's check on a message it handed out early (`Delivery.admitted`)."""

    RUN = "run"  # no cancel got there first
    REVOKED = "revoked"  # a cancel did: ack it unrun (the canceller stored its state)
    TAKEN_BACK = "taken back"  # the check failed: the broker has the message again, to retry


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    queue: str
    body: bytes
    reason: str
    died_at: float


@dataclass(slots=True)
class QueueStats:
    """A namespace's counts at one moment, as `Broker.stats` reads them.

    ``oldest_age_s``: per queue, how long (seconds) its oldest ready message has waited: now
    minus the time the message became ready, which is its enqueue time for a message sent to
    run at once, and its due time for one that waited for an eta, a retry's delay or a lease
    that ran out. A queue is in it only when it has ready messages; a broker that cannot tell
    (RabbitMQ, which does not expose message ages over AMQP) leaves it empty.
    """

    queued: dict[str, int] = field(default_factory=dict)  # ready to run, per queue
    scheduled: int = 0  # waiting for their eta
    running: int = 0  # leased by a worker
    dead: int = 0
    oldest_age_s: dict[str, float] = field(default_factory=dict)


class Broker(abc.ABC):
    """Queues of encoded messages, namespaced. See the module docstring for the guarantees."""

    #: when the Store is this backend itself (same URL and namespace), does `enqueue` store
    #: `OutgoingMessage.state` with the message, saving the app a separate write?
    writes_initial_state: ClassVar[bool] = False

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.lease_s = url.param_float("visibility_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S)
        #: Set by a caller that honours `Delivery.admitted` (the worker): `fetch` may then hand
        #: out a message before the broker's check against its cancellation has come back.
        self.hands_out_early = False

    def bind_store(self, store: Store) -> None:
        """Called with the results store before `connect`, for a broker that keeps part of its
        bookkeeping there (RabbitMQ's dedup keys). Others ignore it."""

    async def connect(self) -> None:
        """Open connections; raise `BrokerUnavailable` (URL masked) when unreachable."""

    async def close(self) -> None:
        """Release connections. Leased messages stay leased until their lease runs out."""

    @abc.abstractmethod
    async def enqueue(self, message: OutgoingMessage) -> str:
        """Store the message durably. Returns its id, or, when ``message.key`` is held by a
        queued or running message, that message's id (and stores nothing)."""

    async def fetch(self, queues: Sequence[str], limit: int, timeout_s: float) -> list[Delivery]:
        """Lease up to ``limit`` ready messages from ``queues`` (highest priority first, queues
        in the order given for equal priority). Waits up to ``timeout_s`` for the first one;
        returns [] when none came."""
        names = tuple(dict.fromkeys(queues))  # a queue named twice would be claimed from twice
        if limit <= 0 or not names:
            return []
        return await self._fetch(names, limit, max(timeout_s, 0.0))

    @abc.abstractmethod
    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        """`fetch` for distinct queues (at least one), ``limit`` >= 1 and ``timeout_s`` >= 0."""

    def refills_with(self, store: Store) -> bool:
        """Does `store_and_ack` with this store lease the next messages when asked (its
        ``refill``)? A worker whose broker says no never waits for a refill."""
        return False

    def local_ready(self, queues: Sequence[str]) -> int:
        """How many messages of these queues this object already holds, ready to hand out
        without asking the server (a push broker's deliveries); 0 for brokers that pull. A
        worker then asks for a refill even when its last fetch did not fill every place."""
        return 0

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """The outcome is stored: forget these messages and release their keys."""
        if deliveries:
            await self._ack(deliveries)

    @abc.abstractmethod
    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """`ack` for at least one delivery."""

    async def store_and_ack(
        self,
        store: Store,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        deliveries: Sequence[Delivery],
        refill: tuple[Sequence[str], int] | None = None,
    ) -> list[Delivery]:
        """Store outcome states in ``store``, then acknowledge ``deliveries``. A broker that is
        also the store (same backend) may do both in one step; it must never ack first.

        ``refill`` (queues, limit), for a broker that `refills_with` the store: then lease up to ``limit``
        ready messages of those queues, as ``fetch(queues, limit, 0)`` would, and return them, so
        a busy worker gets its next messages in the same round trip. Others return []."""
        if states:
            await store.put_states(states, ttl_s, final)
        if deliveries:
            await self.ack(deliveries)
        return []

    async def requeue(self, delivery: Delivery, body: bytes | None = None, delay_s: float = 0.0) -> None:
        """Put a leased message back, optionally with a new body (next attempt), visible after
        ``delay_s``. Atomic: the message is never lost nor duplicated in between."""
        await self._requeue(delivery, body, max(delay_s, 0.0))

    @abc.abstractmethod
    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        """`requeue` with ``delay_s`` >= 0."""

    async def extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Heartbeat: renew the leases of messages still running, by ``lease_s`` from now.

        Returns those of ``deliveries`` whose receipt no longer holds its message (claimed again
        by another fetch after this lease ran out, or gone): a worker must not settle them,
        since another one runs them now. A lease that ran out but whose message nobody has
        claimed since is renewed."""
        if not deliveries:
            return []
        return await self._extend(deliveries)

    @abc.abstractmethod
    async def _extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """`extend` for at least one delivery."""

    @abc.abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a leased message to the dead letters with the reason (acknowledging it)."""

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""

    @abc.abstractmethod
    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        """Remove dead letters (all when ``ids`` is None) and return them, for re-enqueueing."""

    @abc.abstractmethod
    async def cancel(self, message_id: str) -> bool:
        """Remove the message if it is still queued or scheduled (not leased). True if removed."""

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Remove every ready or scheduled message of a queue; returns how many."""

    @abc.abstractmethod
    async def stats(self) -> QueueStats:
        """Queue depths, scheduled, running and dead-letter counts for this namespace."""

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        """Does a message of ``queues`` that waits for its time (an eta, a countdown, a retry's
        or a hold-back's delay) become ready within ``within_s`` seconds (or is it due already)?
        Leased messages do not count. A burst worker asks this before it exits, so that it
        does not leave behind a retry it has just scheduled. The default, False, is for a
        broker that cannot tell: its burst workers exit as soon as nothing is ready."""
        return False

    async def flush_namespace(self) -> None:
        """Remove everything of this namespace (tests)."""
        raise NotImplementedError


class Watch(abc.ABC):
    """Signals that the state of one of the watched tasks may have changed."""

    @abc.abstractmethod
    async def wait(self, timeout_s: float) -> bool:
        """Wait until a change is signalled (True) or the timeout passes (False). Spurious
        wake-ups are allowed: callers re-read the state."""

    def final_state(self, task_id: str) -> bytes | None:
        """The task's final state as it came with a change signal, for a store that sends final
        states along (a waiter then need not read it); None otherwise."""
        return None

    def final_states(self, task_ids: Sequence[str]) -> list[bytes] | None:
        """Every one of the tasks' final states as they came with their signals (the answer,
        without a read), or None unless all of them came."""
        finals: list[bytes] = []
        for task_id in task_ids:
            raw = self.final_state(task_id)
            if raw is None:
                return None
            finals.append(raw)
        return finals


class Store(abc.ABC):
    """Task states, change notifications, pub/sub channels and a small key-value space."""

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self.url = url
        self.namespace = namespace

    async def connect(self) -> None:
        """Open connections; raise `BrokerUnavailable` when unreachable."""

    async def close(self) -> None:
        """Release connections."""

    # -- task states ---------------------------------------------------------------------
    async def put_states(
        self, states: Sequence[StateRow], ttl_s: float | None = None, final: Collection[str] = ()
    ) -> None:
        """Store each (task id, encoded state) and signal watchers of those ids. ``final`` names
        the ids whose state is their last: a store with a `Direct` face hands those to blocked
        `Direct.wait_final` callers. A ``ttl_s`` of None or <= 0 keeps them until deleted."""
        if states:
            await self._put_states(state_rows(states), kept_for(ttl_s), final)

    @abc.abstractmethod
    async def _put_states(self, states: Sequence[StateRow], ttl_s: float | None, final: Collection[str]) -> None:
        """`put_states` for at least one state; ``ttl_s`` is None or > 0."""

    async def put_states_if_absent(self, states: Sequence[StateRow], ttl_s: float | None = None) -> None:
        """`put_states` for the ids that have no state yet (or an expired one), each atomically;
        the others keep theirs. For the QUEUED state written while the message is being sent:
        a worker that was quicker has stored a later state, which must stay."""
        if states:
            await self._put_states_if_absent(state_rows(states), kept_for(ttl_s))

    @abc.abstractmethod
    async def _put_states_if_absent(self, states: Sequence[StateRow], ttl_s: float | None) -> None:
        """`put_states_if_absent` for at least one state; ``ttl_s`` is None or > 0."""

    @abc.abstractmethod
    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        """The stored states, None for ids never stored (or expired)."""

    async def get_state(self, task_id: str) -> bytes | None:
        return (await self.get_states([task_id]))[0]

    async def history(self, query: HistoryQuery) -> list[tuple[str, bytes]]:
        """The (task id, state) of the live states whose listing matches ``query``, newest
        queued first. A state stored without a listing is never in it; an expired one drops
        out of it with its state."""
        if query.limit <= 0:
            return []
        return await self._history(query)

    @abc.abstractmethod
    async def _history(self, query: HistoryQuery) -> list[tuple[str, bytes]]:
        """`history` for a ``query.limit`` >= 1."""

    @abc.abstractmethod
    def watch(self, task_ids: Sequence[str]) -> AbstractAsyncContextManager[Watch]:
        """Subscribe to changes of these tasks. Entering it subscribes before returning, so a
        read of the state made after entering cannot miss a change."""

    # -- pub/sub -------------------------------------------------------------------------
    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes) -> None:
        """Deliver to every subscriber of the channel connected now."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Messages published on the channel after entering, in order."""

    # -- key-value (locks, counters, dedup of periodic runs) -----------------------------
    @abc.abstractmethod
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Store the value unless the key exists; True if stored. Atomic across processes."""

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None) -> list[bytes | None]:
        """`set_if_absent` for each (key, value), each key atomically: None where the value was
        stored, else the value the key held. Stores override it to answer in one round trip."""
        out: list[bytes | None] = []
        for key, value in items:
            # Not atomic across the two calls: a key deleted in between gives None too.
            out.append(None if await self.set_if_absent(key, value, ttl_s) else await self.get_value(key))
        return out

    async def put_states_and_set_many_if_absent(
        self,
        states: Sequence[StateRow],
        ttl_s: float | None,
        final: Collection[str],
        items: Sequence[tuple[str, bytes]],
        items_ttl_s: float | None = None,
    ) -> list[bytes | None]:
        """`put_states`, then `set_many_if_absent`: for a broker whose claims live in the store,
        the claims of its next messages ride along with a batch of outcomes. Stores override it
        to answer in one round trip."""
        await self.put_states(states, ttl_s, final)
        return await self.set_many_if_absent(items, items_ttl_s)

    @abc.abstractmethod
    async def get_value(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete_value(self, key: str) -> None: ...

    @abc.abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Atomically add to an integer counter (created at 0); ``ttl_s`` applies on creation."""

    # -- the worker registry (offload.workers) ----------------------------------------------
    @abc.abstractmethod
    async def put_worker(self, worker_id: str, record: bytes, ttl_s: float) -> None:
        """Write (or renew) a live worker's record; it is gone ``ttl_s`` seconds after the last write."""

    @abc.abstractmethod
    async def drop_worker(self, worker_id: str) -> None:
        """Remove a worker's record at once (its clean exit)."""

    @abc.abstractmethod
    async def workers(self) -> list[bytes]:
        """The records of the namespace's workers whose time has not run out, in no order."""

    async def flush_namespace(self) -> None:
        """Remove everything of this namespace (tests)."""
        raise NotImplementedError


class Direct(abc.ABC):
    """Blocking access from the caller's own thread, for the sync face (`delay()`, `get()`).

    Optional: a backend that offers one saves each sync call the hop to offload's event loop
    thread and back. Every method is safe to call from several threads at once.
    """

    @abc.abstractmethod
    def enqueue(self, message: OutgoingMessage) -> str:
        """As `Broker.enqueue`, for a message without a dedup key whose state goes with it."""

    @abc.abstractmethod
    def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        """As `Store.get_states`."""

    @abc.abstractmethod
    def wait_final(self, task_id: str, timeout_s: float) -> bytes | None:
        """Block until the task's final state is stored (its bytes), or None after ``timeout_s``.
        A final state stored before the call is returned at once while the store still signals
        it (at least a minute); callers read the state first and wait only if it is not final."""

    @abc.abstractmethod
    def close(self) -> None: ...


def kept_for(ttl_s: float | None) -> float | None:
    """A time to live as every backend reads it: seconds > 0, or None for "until deleted"."""
    return ttl_s if ttl_s is not None and ttl_s > 0 else None


def expires_at(ttl_s: float | None) -> float | None:
    """The epoch second when something kept for ``ttl_s`` expires; None when it never does."""
    kept = kept_for(ttl_s)
    return None if kept is None else time.time() + kept


def ttl_ms(ttl_s: float | None) -> int | None:
    """A time to live in whole milliseconds (at least 1), for servers that count in them."""
    kept = kept_for(ttl_s)
    return None if kept is None else max(math.ceil(kept * 1000), 1)


def now() -> float:
    return time.time()
