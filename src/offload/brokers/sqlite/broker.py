"""`SqliteBroker`: the queues, as rows of one ``messages`` table.

* A message row is ready (`READY`), scheduled (`SCHEDULED`: its ``visible_at`` is an eta or a
  retry delay) or leased (`LEASED`: ``visible_at`` is when the lease runs out). A fetch claims,
  in one UPDATE, the best of the ready rows (a partial index in priority and arrival order)
  and of the rows whose ``visible_at`` has passed (a partial index by time): an expired lease
  is thus handed out again with its delivery count raised, which is the whole reaper, and a
  large backlog of delayed or running messages is never scanned.
* A claim's random lease token is the delivery's receipt: ack, requeue, extend and dead_letter
  change the row only while it still carries that token, which the next claim replaces and a
  requeue clears. A lease that ran out thus stays good until someone claims the message again.
* Waiting never polls tightly: the notifier wakes a waiting fetch in every process when its
  queue changes; a fetch also wakes when its earliest scheduled row or lease falls due, and
  re-reads on a slow safety poll in case a wake-up was lost.
* A dedup key is a unique index on the rows: it is held while its message exists.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from offload.brokers.base import Broker, DeadLetter, Delivery, OutgoingMessage, QueueStats
from offload.brokers.sqlite import admin, notify, queries
from offload.brokers.sqlite.connection import transaction
from offload.brokers.sqlite.database import Handle
from offload.brokers.sqlite.store import state_params, write_state_rows
from offload.brokers.states import StateRow
from offload.config import BrokerURL

__all__ = ["LEASED", "READY", "SCHEDULED", "SqliteBroker"]

READY, SCHEDULED, LEASED = 0, 1, 2

_PROMOTE_EVERY_S = 0.5


class SqliteBroker(Broker):
    writes_initial_state = True

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._h = Handle(url)
        self._next_promote = 0.0

    def _topic(self, queue: str) -> str:
        return f"q:{self.namespace}:{queue}"

    async def connect(self) -> None:
        await self._h.connect()

    async def close(self) -> None:
        await self._h.close()

    # -- enqueue -----------------------------------------------------------------------
    async def enqueue(self, message: OutgoingMessage) -> str:
        return await self._h.call_batched(self._enqueue, message)

    def _row(self, m: OutgoingMessage, now: float) -> tuple[Any, ...]:
        scheduled = m.eta is not None and m.eta > now
        return (self.namespace, m.id, m.queue, m.priority, m.body, SCHEDULED if scheduled else READY,
                m.eta if scheduled else now, m.key)

    def _enqueue(self, conn: sqlite3.Connection, messages: list[OutgoingMessage]) -> list[str]:
        """Enqueue what concurrent callers sent, in one transaction. Returns each one's id, or
        the id of the message holding its key."""
        now = time.time()
        holders = [m.id for m in messages]
        # A first state must commit with its message: a worker could otherwise claim the
        # message and store STARTED before the QUEUED state lands on top of it.
        with_states = any(m.state is not None for m in messages)
        if all(m.key is None for m in messages):
            # No key: the only conflict is an id enqueued twice, which is idempotent, so the
            # rows go in as few statements as possible.
            rows = [v for m in messages for v in self._row(m, now)]
            step = queries.ROWS_PER_INSERT * 8
            with transaction(conn) if len(rows) > step or with_states else contextlib.nullcontext():
                for i in range(0, len(rows), step):
                    chunk = rows[i : i + step]
                    conn.execute(queries.insert_rows(len(chunk) // 8), chunk)
                self._put_first_states(conn, messages, holders, now)
        else:
            # Insert-or-find-the-holder must be one step, or the holder could be acked between
            # the two and a message silently dropped.
            with transaction(conn):
                for i, m in enumerate(messages):
                    if conn.execute(queries.INSERT, self._row(m, now)).rowcount == 0 and m.key is not None:
                        found = conn.execute(queries.KEY_HOLDER, (self.namespace, m.key)).fetchone()
                        holders[i] = found[0] if found else m.id
                self._put_first_states(conn, messages, holders, now)
        # Also for scheduled messages: waiting fetches re-arm their timer on the eta.
        self._h.notifier.notify({self._topic(m.queue) for m in messages})
        return holders

    def _put_first_states(self, conn: sqlite3.Connection, messages: list[OutgoingMessage], holders: list[str], now: float) -> None:
        """The tasks' first states, in the enqueue's own transaction (never for a dedup loser)."""
        write_state_rows(conn, [
            v for m, holder in zip(messages, holders, strict=True) if m.state is not None and holder == m.id
            for v in state_params(self.namespace, StateRow(m.id, m.state, m.state_listing), now + m.state_ttl_s if m.state_ttl_s else None)
        ])

    # -- fetch ---------------------------------------------------------------------------
    async def _fetch(self, queues: tuple[str, ...], limit: int, timeout_s: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        with self._h.notifier.listen(self._topic(q) for q in queues) as listener:
            while True:
                got, next_due = await self._h.call(self._claim, queues, limit, orphan=self._unclaim)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                wait = min(left, notify.SAFETY_POLL_S)
                if next_due is not None:
                    wait = min(wait, max(next_due - time.time(), 0.001))
                await listener.wait(wait)

    def _claim(self, conn: sqlite3.Connection, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        ns = self.namespace
        sql = queries.claim(len(queues))
        now = time.time()
        if now >= self._next_promote:
            # The claim sees due rows by itself; promoting them now and then only keeps that
            # set small when very many fall due at once (a crowd sharing one eta).
            conn.execute(sql.promote, (ns, *queues, now))
            self._next_promote = now + _PROMOTE_EVERY_S
        until, token = now + self.lease_s, random.getrandbits(62)
        params: list[Any] = [until, token]
        for q in queues:
            params += (ns, q, limit, ns, q, now)
        params.append(limit)
        if conn.execute(sql.claim, params).rowcount == 0:
            due = conn.execute(sql.next_due, [v for q in queues for v in (ns, q)]).fetchone()[0]
            return [], due
        # A separate read is safe: until the lease runs out nobody but us touches these rows,
        # and a row someone else took meanwhile no longer carries our token.
        meta, bodies = conn.execute(sql.claimed, (ns, *queues, until, token)).fetchone()
        bodies = bodies or b""  # NULL when every body is empty
        rank = {q: i for i, q in enumerate(queues)}
        rows, at = [], 0
        for seq, mid, queue, deliveries, priority, size in json.loads(meta):
            rows.append(((-priority, rank[queue], seq), Delivery(mid, queue, bodies[at : at + size], deliveries, token)))
            at += size
        rows.sort(key=lambda r: r[0])
        return [d for _, d in rows], None

    def _unclaim(self, conn: sqlite3.Connection, result: tuple[list[Delivery], float | None]) -> None:
        # The fetch was cancelled after its claim committed: nobody will run these, so hand
        # them back now instead of after a whole lease.
        deliveries = result[0]
        if not deliveries:
            return
        with transaction(conn):
            conn.executemany(queries.UNCLAIM, [(self.namespace, d.id, d.receipt) for d in deliveries])
        self._h.notifier.notify({self._topic(d.queue) for d in deliveries})

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        return await self._h.call(self._due_within, list(dict.fromkeys(queues)), within_s)

    def _due_within(self, conn: sqlite3.Connection, queues: list[str], within_s: float) -> bool:
        if not queues:
            return False
        found = conn.execute(queries.due_within(len(queues)), (self.namespace, *queues, SCHEDULED, time.time() + within_s))
        return bool(found.fetchone()[0])

    # -- settle --------------------------------------------------------------------------
    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._h.call_batched(self._ack_rows, [(d.id, d.receipt) for d in deliveries])

    def _ack_rows(self, conn: sqlite3.Connection, calls: list[list[tuple[str, int | None]]]) -> list[None]:
        # One statement for every (id, receipt) of every concurrent caller: one commit, and one
        # trip through the GIL instead of one per row.
        held = [pair for call in calls for pair in call]
        if len(held) == 1:
            [(mid, receipt)] = held
            conn.execute(queries.ACK, (self.namespace, mid, receipt, receipt))
        else:
            conn.execute(queries.ACK_MANY, (json.dumps(held), self.namespace))
        return [None] * len(calls)

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        await self._h.call(self._requeue_row, delivery, body, delay_s)

    def _requeue_row(self, conn: sqlite3.Connection, d: Delivery, body: bytes | None, delay_s: float) -> None:
        state = SCHEDULED if delay_s > 0 else READY
        conn.execute(queries.REQUEUE, (body, state, time.time() + max(delay_s, 0.0), self.namespace, d.id, d.receipt, d.receipt))
        self._h.notifier.notify((self._topic(d.queue),))

    async def _extend(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        return await self._h.call(self._extend_rows, list(deliveries))

    def _extend_rows(self, conn: sqlite3.Connection, deliveries: list[Delivery]) -> list[Delivery]:
        until = time.time() + self.lease_s
        # One statement a row, in one transaction: each row's count says whether it is still ours.
        with transaction(conn):
            return [d for d in deliveries
                    if not conn.execute(queries.EXTEND, (until, self.namespace, d.id, d.receipt, d.receipt)).rowcount]

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._h.call(self._dead_letter, delivery, reason)

    def _dead_letter(self, conn: sqlite3.Connection, d: Delivery, reason: str) -> None:
        with transaction(conn):
            # A holder whose message was claimed again buries nothing: the new holder runs it.
            if conn.execute(queries.ACK, (self.namespace, d.id, d.receipt, d.receipt)).rowcount:
                conn.execute(queries.BURY, (self.namespace, d.id, d.queue, d.body, reason, time.time()))

    # -- management (see admin) ------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._h.call(admin.dead_letters, self.namespace, limit)

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        return await self._h.call(admin.replay, self.namespace, None if ids is None else list(ids))

    async def cancel(self, message_id: str) -> bool:
        return await self._h.call(admin.cancel, self.namespace, message_id)

    async def purge(self, queue: str) -> int:
        return await self._h.call(admin.purge, self.namespace, queue)

    async def stats(self) -> QueueStats:
        return await self._h.call(admin.stats, self.namespace)

    async def flush_namespace(self) -> None:
        await self._h.call(admin.flush_broker, self.namespace)
