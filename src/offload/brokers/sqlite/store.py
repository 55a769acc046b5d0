"""`SqliteStore`: task states, their watches, pub/sub channels and the key-value space, in the
same file as the queues.

* A state row may carry an expiry; an expired row reads as absent and waits for the prune,
  which the store's own writes set off every few seconds (`admin.prune`).
* A watch, and a subscriber between two reads, waits on the notifier: every process's writer
  signals the task's or the channel's topic after its commit.
* A channel message is a row of ``events``, read by sequence number after the last one seen;
  rows older than a minute are pruned, so a subscriber must keep up within that.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

from offload.brokers.base import WORKER_PREFIX, Store, Watch, expires_at
from offload.brokers.signals import Listener
from offload.brokers.sqlite import admin, notify, queries
from offload.brokers.sqlite.connection import transaction
from offload.brokers.sqlite.database import Handle
from offload.brokers.states import HistoryQuery, StateRow
from offload.config import BrokerURL

__all__ = ["SqliteStore", "state_params", "write_state_rows"]

_PRUNE_EVERY_S = 10.0
_PRUNE_AGAIN_S = 0.5


def state_params(namespace: str, row: StateRow, until: float | None) -> tuple[Any, ...]:
    """One state's parameters of `queries.PUT_STATES`."""
    listed = row.listing
    if listed is None:
        return namespace, row.id, row.data, until, None, None, None, None
    return namespace, row.id, row.data, until, listed.status, listed.name, listed.queue, listed.queued_at


def write_state_rows(conn: sqlite3.Connection, params: list[Any]) -> None:
    """Upsert states given as their `state_params` flattened, in as few statements as
    `queries.STATES_PER_STATEMENT` allows (the caller decides the transaction)."""
    step = queries.STATES_PER_STATEMENT * queries.STATE_COLUMNS
    for i in range(0, len(params), step):
        chunk = params[i : i + step]
        conn.execute(queries.put_states_rows(len(chunk) // queries.STATE_COLUMNS), chunk)


class _SqliteWatch(Watch):
    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    async def wait(self, timeout_s: float) -> bool:
        # The caller chooses how often to re-read without a signal (a lost datagram costs it
        # that much latency): `wait_states` every second, the gateway's thousands of idle
        # waiters far less often. Waking them all every second here would cost a core.
        return await self._listener.wait(timeout_s)


class SqliteStore(Store):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._h = Handle(url)
        self._next_prune = 0.0

    async def connect(self) -> None:
        await self._h.connect()

    async def close(self) -> None:
        await self._h.close()

    def _maybe_prune(self, now: float) -> None:
        # Called on the connection thread after a write. The prune runs as a job of its own,
        # so the write that noticed it was due is answered first.
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            self._h.database().submit(self._prune)

    def _prune(self, conn: sqlite3.Connection) -> None:
        # Come back soon if there was more than one chunk.
        now = time.time()
        if admin.prune(conn, now):
            self._next_prune = now + _PRUNE_AGAIN_S

    # -- task states ---------------------------------------------------------------------
    async def _put_states(self, states: Sequence[StateRow], ttl_s: float | None, final: Collection[str]) -> None:
        await self._h.call_batched(self._write_states, (list(states), ttl_s))

    def _write_states(self, conn: sqlite3.Connection, calls: list[tuple[list[StateRow], float | None]]) -> list[None]:
        ns, now = self.namespace, time.time()
        params = [
            v
            for states, ttl_s in calls
            for until in (expires_at(ttl_s),)
            for row in states
            for v in state_params(ns, row, until)
        ]
        with transaction(conn) if len(params) > queries.STATES_PER_STATEMENT * queries.STATE_COLUMNS else contextlib.nullcontext():
            write_state_rows(conn, params)
        self._h.notifier.notify({f"t:{ns}:{row.id}" for states, _ in calls for row in states})
        self._maybe_prune(now)
        return [None] * len(calls)

    async def _put_states_if_absent(self, states: Sequence[StateRow], ttl_s: float | None) -> None:
        await self._h.call(self._write_states_if_absent, list(states), ttl_s)

    def _write_states_if_absent(self, conn: sqlite3.Connection, states: list[StateRow], ttl_s: float | None) -> None:
        ns, now, until = self.namespace, time.time(), expires_at(ttl_s)
        with transaction(conn):
            for row in states:
                conn.execute(queries.PUT_STATE_IF_ABSENT, (*state_params(ns, row, until), now))
        self._h.notifier.notify({f"t:{ns}:{row.id}" for row in states})

    async def _history(self, query: HistoryQuery) -> list[tuple[str, bytes]]:
        return await self._h.call(self._read_history, query)

    def _read_history(self, conn: sqlite3.Connection, query: HistoryQuery) -> list[tuple[str, bytes]]:
        filters = {"status": query.status, "name": query.name, "queue": query.queue}
        given = tuple(column for column, value in filters.items() if value is not None)
        before = math.inf if query.before is None else query.before
        params = (self.namespace, *(filters[c] for c in given), before, time.time(), query.limit)
        return [(task_id, bytes(data)) for task_id, data in conn.execute(queries.history(given), params)]

    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        return await self._h.call(self._get_states, list(task_ids))

    def _get_states(self, conn: sqlite3.Connection, task_ids: list[str]) -> list[bytes | None]:
        ns, now = self.namespace, time.time()
        if len(task_ids) == 1:
            row = conn.execute(queries.GET_STATE, (ns, task_ids[0], now)).fetchone()
            return [row[0] if row else None]
        found = dict(conn.execute(queries.GET_STATES, (ns, json.dumps(task_ids), now)).fetchall())
        return [found.get(t) for t in task_ids]

    @asynccontextmanager
    async def watch(self, task_ids: Sequence[str]) -> AsyncIterator[Watch]:
        with self._h.notifier.listen(f"t:{self.namespace}:{t}" for t in task_ids) as listener:
            yield _SqliteWatch(listener)

    # -- pub/sub -------------------------------------------------------------------------
    async def publish(self, channel: str, data: bytes) -> None:
        await self._h.call(self._publish, channel, data)

    def _publish(self, conn: sqlite3.Connection, channel: str, data: bytes) -> None:
        now = time.time()
        conn.execute(queries.PUBLISH, (self.namespace, channel, data, now))
        self._h.notifier.notify((f"c:{self.namespace}:{channel}",))
        self._maybe_prune(now)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        ns = self.namespace
        with self._h.notifier.listen([f"c:{ns}:{channel}"]) as listener:
            # Listening first, then the high-water mark: a message committed after the mark is
            # read, and its wake-up is not lost.
            last = await self._h.call(_last_event_seq)

            async def messages() -> AsyncIterator[bytes]:
                nonlocal last
                while True:
                    rows = await self._h.call(_read_events, ns, channel, last)
                    if not rows:
                        await listener.wait(notify.SAFETY_POLL_S)
                        continue
                    for seq, data in rows:
                        last = seq
                        yield data

            yield messages()

    # -- key-value -----------------------------------------------------------------------
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        return await self._h.call(self._set_if_absent, key, value, ttl_s)

    def _set_if_absent(self, conn: sqlite3.Connection, key: str, value: bytes, ttl_s: float | None) -> bool:
        now = time.time()
        # One statement: inserts, or replaces a row whose TTL ran out, or changes nothing. Not
        # `expires_at`, which keeps a TTL <= 0 forever: here a negative one expires at once.
        cur = conn.execute(queries.SET_IF_ABSENT, (self.namespace, key, value, now + ttl_s if ttl_s else None, now))
        self._maybe_prune(now)
        return cur.rowcount == 1

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None) -> list[bytes | None]:
        return await self._h.call(self._set_many_if_absent, list(items), ttl_s)

    def _set_many_if_absent(self, conn: sqlite3.Connection, items: list[tuple[str, bytes]], ttl_s: float | None) -> list[bytes | None]:
        # One trip to the database thread; each key is as atomic as `set_if_absent`.
        return [None if self._set_if_absent(conn, k, v, ttl_s) else self._get_value(conn, k) for k, v in items]

    async def get_value(self, key: str) -> bytes | None:
        return await self._h.call(self._get_value, key)

    def _get_value(self, conn: sqlite3.Connection, key: str) -> bytes | None:
        row = conn.execute(queries.GET_VALUE, (self.namespace, key)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return bytes(row[0])

    async def delete_value(self, key: str) -> None:
        await self._h.call(self._delete_value, key)

    def _delete_value(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute(queries.DELETE_VALUE, (self.namespace, key))

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return await self._h.call(self._incr, key, amount, ttl_s)

    def _incr(self, conn: sqlite3.Connection, key: str, amount: int, ttl_s: float | None) -> int:
        now = time.time()
        with transaction(conn):
            row = conn.execute(queries.GET_VALUE, (self.namespace, key)).fetchone()
            alive = row is not None and (row[1] is None or row[1] > now)
            if alive:
                value, until = int(bytes(row[0]) or b"0") + amount, row[1]
            else:
                value, until = amount, (now + ttl_s if ttl_s else None)
            conn.execute(queries.SET_VALUE, (self.namespace, key, str(value).encode(), until))
        self._maybe_prune(now)
        return value

    # -- the worker registry, in the key-value table under a prefix no user key has ----------
    async def put_worker(self, worker_id: str, record: bytes, ttl_s: float) -> None:
        await self._h.call(self._put_worker, worker_id, record, ttl_s)

    def _put_worker(self, conn: sqlite3.Connection, worker_id: str, record: bytes, ttl_s: float) -> None:
        conn.execute(queries.SET_VALUE, (self.namespace, WORKER_PREFIX + worker_id, record, time.time() + ttl_s))

    async def drop_worker(self, worker_id: str) -> None:
        await self.delete_value(WORKER_PREFIX + worker_id)

    async def workers(self) -> list[bytes]:
        return await self._h.call(self._workers)

    def _workers(self, conn: sqlite3.Connection) -> list[bytes]:
        # The prefix's keys are those from it up to the same text with its last character raised.
        high = WORKER_PREFIX[:-1] + chr(ord(WORKER_PREFIX[-1]) + 1)
        rows = conn.execute(queries.LIVE_VALUES_IN_RANGE, (self.namespace, WORKER_PREFIX, high, time.time())).fetchall()
        return [bytes(r[0]) for r in rows]

    async def flush_namespace(self) -> None:
        await self._h.call(admin.flush_store, self.namespace)


def _last_event_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute(queries.LAST_EVENT_SEQ).fetchone()[0])


def _read_events(conn: sqlite3.Connection, ns: str, channel: str, after: int) -> list[tuple[int, bytes]]:
    return conn.execute(queries.READ_EVENTS, (ns, channel, after)).fetchall()
