"""``memory://[name]``: one process, no persistence. For tests and for trying things out.

Apps created with the same ``memory://name`` URL in one process share queues and results, so a
worker running in a thread sees what the test enqueued. This module also serves as the plainest
statement of the protocol's semantics (the state machine is drawn in `offload.brokers.base`).

A delivery's receipt is the message's delivery count at its claim: every claim raises it, so it
names the claim. Ack, requeue, extend and dead letter act only for the receipt of the latest
claim (a delivery without a receipt passes), and a requeue retires that receipt.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from offload.brokers.base import (
    WORKER_PREFIX,
    Broker,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    QueueStats,
    Store,
    Watch,
    expires_at,
)
from offload.brokers.signals import Signals
from offload.brokers.states import HistoryQuery, Listing, StateRow
from offload.config import BrokerURL


@dataclass(slots=True)
class _Message:
    id: str
    queue: str
    body: bytes
    priority: int
    visible_at: float
    seq: int
    key: str | None
    leased: bool = False
    deliveries: int = 0
    lease: int | None = None  # the receipt of the latest claim, until a requeue


@dataclass
class _Lanes:
    """One queue's indexes. Entries are checked against the message when popped, so a message
    that was acked, cancelled or re-leased leaves stale entries behind instead of costing a scan."""

    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, seq, id)
    # Not yet visible: delayed messages and leases, by the time they become visible.
    waiting: list[tuple[float, int, str, int]] = field(default_factory=list)  # (visible_at, seq, id, deliveries)

    def promote(self, messages: dict[tuple[str, str], _Message], ns: str, now: float) -> None:
        while self.waiting and self.waiting[0][0] <= now:
            visible_at, _, mid, deliveries = heapq.heappop(self.waiting)
            m = messages.get((ns, mid))
            if m is not None and m.visible_at == visible_at and m.deliveries == deliveries:
                m.leased = False
                heapq.heappush(self.ready, (-m.priority, m.seq, m.id))

    def head(self, messages: dict[tuple[str, str], _Message], ns: str) -> tuple[int, int, str] | None:
        while self.ready:
            entry = self.ready[0]
            m = messages.get((ns, entry[2]))
            if m is not None and not m.leased and m.seq == entry[1]:
                return entry
            heapq.heappop(self.ready)
        return None


@dataclass(frozen=True, eq=False)
class _Subscriber:
    """One `subscribe` of a channel: its queue and the loop that reads it (publish may come
    from another thread's loop)."""

    queue: asyncio.Queue[bytes]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Space:
    """Everything stored under one memory URL."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    signals: Signals = field(default_factory=Signals)
    messages: dict[tuple[str, str], _Message] = field(default_factory=dict)  # (ns, id)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, key) -> id
    dead: dict[tuple[str, str], DeadLetter] = field(default_factory=dict)
    states: dict[tuple[str, str], tuple[bytes, float | None]] = field(default_factory=dict)
    listings: dict[tuple[str, str], Listing] = field(default_factory=dict)  # the history's index
    values: dict[tuple[str, str], tuple[bytes, float | None]] = field(default_factory=dict)
    channels: dict[tuple[str, str], set[_Subscriber]] = field(default_factory=dict)
    lanes: dict[tuple[str, str], _Lanes] = field(default_factory=dict)
    seq: int = 0


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(url: BrokerURL) -> _Space:
    with _SPACES_LOCK:
        return _SPACES.setdefault(url.path or "default", _Space())


def _alive(entry: tuple[bytes, float | None] | None) -> bytes | None:
    if entry is None or (entry[1] is not None and entry[1] < time.time()):
        return None
    return entry[0]


class MemoryBroker(Broker):
    writes_initial_state = True

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._s = _space(url)

    def _topic(self, queue: str) -> str:
        return f"q:{self.namespace}:{queue}"

    async def enqueue(self, message: OutgoingMessage) -> str:
        s, ns = self._s, self.namespace
        with s.lock:
            if message.key is not None:
                holder = s.keys.get((ns, message.key))
                if holder is not None and (ns, holder) in s.messages:
                    return holder
                s.keys[(ns, message.key)] = message.id
            s.seq += 1
            # A message due now (or overdue) is visible from now: `stats` ages it from there.
            now = time.time()
            visible_at = message.eta if message.eta is not None and message.eta > now else now
            m = s.messages[(ns, message.id)] = _Message(
                message.id, message.queue, message.body, message.priority, visible_at, s.seq, message.key,
            )
            self._index(m)
            if message.state is not None:
                until = time.time() + message.state_ttl_s if message.state_ttl_s else None
                s.states[(ns, message.id)] = (message.state, until)
                if message.state_listing is not None:
                    s.listings[(ns, message.id)] = message.state_listing
        s.signals.notify([self._topic(message.queue)])
        return message.id

    def _index(self, m: _Message) -> None:
        lane = self._lanes(m.queue)
        if m.visible_at > time.time():
            heapq.heappush(lane.waiting, (m.visible_at, m.seq, m.id, m.deliveries))
        else:
            heapq.heappush(lane.ready, (-m.priority, m.seq, m.id))

    def _lanes(self, queue: str) -> _Lanes:
        return self._s.lanes.setdefault((self.namespace, queue), _Lanes())

    def _claim(self, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        now = time.time()
        out: list[Delivery] = []
        next_due: float | None = None
        with self._s.lock:
            lanes = [self._lanes(q) for q in queues]
            for lane in lanes:
                lane.promote(self._s.messages, self.namespace, now)
                if lane.waiting:
                    due = lane.waiting[0][0]
                    next_due = due if next_due is None else min(next_due, due)
            while len(out) < limit:
                # Highest priority first; for equal priority the queue named first, then FIFO.
                best = None
                for order, lane in enumerate(lanes):
                    head = lane.head(self._s.messages, self.namespace)
                    if head is not None and (best is None or (head[0], order, head[1]) < (best[0][0], best[1], best[0][1])):
                        best = (head, order)
                if best is None:
                    break
                (_, _, mid), order = best
                heapq.heappop(lanes[order].ready)
                m = self._s.messages[(self.namespace, mid)]
                m.leased = True
                m.deliveries += 1
                m.lease = m.deliveries
                m.visible_at = now + self.lease_s
                heapq.heappush(lanes[order].waiting, (m.visible_at, m.seq, m.id, m.deliveries))
                out.append(Delivery(m.id, m.queue, m.body, m.deliveries, receipt=m.lease))
        return out, next_due

    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        with self._s.signals.listen(self._topic(q) for q in queues) as listener:
            while True:
                got, next_due = self._claim(queues, limit)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                if next_due is not None:
                    left = min(left, max(next_due - time.time(), 0.001))
                await listener.wait(left)

    def _held(self, delivery: Delivery) -> _Message | None:
        """The message, while ``delivery`` carries the receipt of its latest claim. A lease that
        ran out still counts until someone claims the message again: finishing it then is no
        harm, and saves running it twice."""
        m = self._s.messages.get((self.namespace, delivery.id))
        if m is None or (delivery.receipt is not None and delivery.receipt != m.lease):
            return None
        return m

    def _drop(self, delivery_id: str) -> _Message | None:
        m = self._s.messages.pop((self.namespace, delivery_id), None)
        if m is not None and m.key is not None and self._s.keys.get((self.namespace, m.key)) == m.id:
            del self._s.keys[(self.namespace, m.key)]
        return m

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._s.lock:
            for d in deliveries:
                if self._held(d) is not None:
                    self._drop(d.id)

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        with self._s.lock:
            m = self._held(delivery)
            if m is None:
                return
            if body is not None:
                m.body = body
            m.leased = False
            m.lease = None
            m.visible_at = time.time() + delay_s
            self._s.seq += 1
            m.seq = self._s.seq
            self._index(m)
        self._s.signals.notify([self._topic(delivery.queue)])

    async def _extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        until = time.time() + self.lease_s
        lost = []
        with self._s.lock:
            for d in deliveries:
                m = self._held(d)
                if m is not None and m.leased:
                    m.visible_at = until
                    heapq.heappush(self._lanes(m.queue).waiting, (until, m.seq, m.id, m.deliveries))
                else:
                    lost.append(d)
        return lost

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._s.lock:
            if self._held(delivery) is None:
                return
            self._drop(delivery.id)
            self._s.dead[(self.namespace, delivery.id)] = DeadLetter(
                delivery.id, delivery.queue, delivery.body, reason, time.time()
            )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._s.lock:
            mine = [d for (ns, _), d in self._s.dead.items() if ns == self.namespace]
        return sorted(mine, key=lambda d: d.died_at, reverse=True)[:limit]

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        with self._s.lock:
            keys = [k for k in self._s.dead if k[0] == self.namespace and (ids is None or k[1] in ids)]
            return [self._s.dead.pop(k) for k in keys]

    async def cancel(self, message_id: str) -> bool:
        with self._s.lock:
            m = self._s.messages.get((self.namespace, message_id))
            if m is None or m.leased:
                return False
            self._drop(message_id)
            return True

    async def purge(self, queue: str) -> int:
        with self._s.lock:
            ids = [m.id for (ns, _), m in self._s.messages.items() if ns == self.namespace and m.queue == queue and not m.leased]
            for i in ids:
                self._drop(i)
            return len(ids)

    async def stats(self) -> QueueStats:
        now = time.time()
        out = QueueStats()
        with self._s.lock:
            for (ns, _), m in self._s.messages.items():
                if ns != self.namespace:
                    continue
                if m.leased:
                    out.running += 1
                elif m.visible_at > now:
                    out.scheduled += 1
                else:
                    out.queued[m.queue] = out.queued.get(m.queue, 0) + 1
                    # visible_at is when it became ready: enqueued, due, or its lease ran out.
                    age = now - m.visible_at
                    out.oldest_age_s[m.queue] = max(out.oldest_age_s.get(m.queue, 0.0), age)
            out.dead = sum(1 for (ns, _) in self._s.dead if ns == self.namespace)
        return out

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        until, wanted = time.time() + within_s, set(queues)
        with self._s.lock:
            return any(
                ns == self.namespace and m.queue in wanted and not m.leased and m.visible_at <= until
                for (ns, _), m in self._s.messages.items()
            )

    async def flush_namespace(self) -> None:
        with self._s.lock:
            for table in (self._s.messages, self._s.keys, self._s.dead, self._s.lanes):
                for k in [k for k in table if k[0] == self.namespace]:
                    del table[k]


class _MemoryWatch(Watch):
    def __init__(self, listener: object) -> None:
        self._listener = listener

    async def wait(self, timeout_s: float) -> bool:
        return await self._listener.wait(timeout_s)  # type: ignore[attr-defined,no-any-return]


class MemoryStore(Store):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._s = _space(url)

    def _topic(self, task_id: str) -> str:
        return f"t:{self.namespace}:{task_id}"

    async def _put_states(self, states: Sequence[StateRow], ttl_s: float | None, final: Collection[str]) -> None:
        until = expires_at(ttl_s)
        with self._s.lock:
            for row in states:
                self._store_row(row, until)
        self._s.signals.notify(self._topic(row.id) for row in states)

    def _store_row(self, row: StateRow, until: float | None) -> None:
        slot = (self.namespace, row.id)
        self._s.states[slot] = (row.data, until)
        if row.listing is not None:
            self._s.listings[slot] = row.listing
        else:
            self._s.listings.pop(slot, None)

    async def _put_states_if_absent(self, states: Sequence[StateRow], ttl_s: float | None) -> None:
        until = expires_at(ttl_s)
        stored: list[str] = []
        with self._s.lock:
            for row in states:
                if _alive(self._s.states.get((self.namespace, row.id))) is None:
                    self._store_row(row, until)
                    stored.append(row.id)
        self._s.signals.notify(self._topic(t) for t in stored)

    async def _history(self, query: HistoryQuery) -> list[tuple[str, bytes]]:
        # A scan: this backend holds one process's tasks, never the 100,000 the others index for.
        with self._s.lock:
            found = []
            for (ns, task_id), listing in self._s.listings.items():
                data = _alive(self._s.states.get((ns, task_id))) if ns == self.namespace and query.matches(listing) else None
                if data is not None:
                    found.append((listing.queued_at, task_id, data))
        found.sort(key=lambda f: f[0], reverse=True)
        return [(task_id, data) for _, task_id, data in found[: query.limit]]

    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        with self._s.lock:
            return [_alive(self._s.states.get((self.namespace, t))) for t in task_ids]

    @asynccontextmanager
    async def watch(self, task_ids: Sequence[str]) -> AsyncIterator[Watch]:  # type: ignore[override, unused-ignore]
        with self._s.signals.listen(self._topic(t) for t in task_ids) as listener:
            yield _MemoryWatch(listener)

    async def publish(self, channel: str, data: bytes) -> None:
        with self._s.lock:
            queues = list(self._s.channels.get((self.namespace, channel), ()))
        for subscriber in queues:
            subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, data)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:  # type: ignore[override, unused-ignore]
        q: asyncio.Queue[bytes] = asyncio.Queue()
        subscriber = _Subscriber(q, asyncio.get_running_loop())
        key = (self.namespace, channel)
        with self._s.lock:
            self._s.channels.setdefault(key, set()).add(subscriber)

        async def messages() -> AsyncIterator[bytes]:
            while True:
                yield await q.get()

        try:
            yield messages()
        finally:
            with self._s.lock:
                self._s.channels.get(key, set()).discard(subscriber)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        with self._s.lock:
            k = (self.namespace, key)
            if _alive(self._s.values.get(k)) is not None:
                return False
            self._s.values[k] = (value, time.time() + ttl_s if ttl_s else None)
            return True

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None) -> list[bytes | None]:
        with self._s.lock:
            out: list[bytes | None] = []
            for key, value in items:
                k = (self.namespace, key)
                held = _alive(self._s.values.get(k))
                if held is None:
                    self._s.values[k] = (value, time.time() + ttl_s if ttl_s else None)
                out.append(held)
            return out

    async def get_value(self, key: str) -> bytes | None:
        with self._s.lock:
            return _alive(self._s.values.get((self.namespace, key)))

    async def delete_value(self, key: str) -> None:
        with self._s.lock:
            self._s.values.pop((self.namespace, key), None)

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        with self._s.lock:
            k = (self.namespace, key)
            entry = self._s.values.get(k)
            current = _alive(entry)
            value = int(current or b"0") + amount
            until = entry[1] if current is not None and entry is not None else (time.time() + ttl_s if ttl_s else None)
            self._s.values[k] = (str(value).encode(), until)
            return value

    # The registry lives in the key-value space under a prefix no user key has.
    async def put_worker(self, worker_id: str, record: bytes, ttl_s: float) -> None:
        with self._s.lock:
            self._s.values[(self.namespace, WORKER_PREFIX + worker_id)] = (record, time.time() + ttl_s)

    async def drop_worker(self, worker_id: str) -> None:
        await self.delete_value(WORKER_PREFIX + worker_id)

    async def workers(self) -> list[bytes]:
        with self._s.lock:
            found = [_alive(v) for (ns, key), v in self._s.values.items() if ns == self.namespace and key.startswith(WORKER_PREFIX)]
        return [r for r in found if r is not None]

    async def flush_namespace(self) -> None:
        with self._s.lock:
            for table in (self._s.states, self._s.listings, self._s.values):
                for k in [k for k in table if k[0] == self.namespace]:
                    del table[k]


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return MemoryBroker(url, namespace)


def make_store(url: BrokerURL, namespace: str) -> Store:
    return MemoryStore(url, namespace)
