"""What operators and housekeeping do to the file, as functions run on the database thread:
dead letters and their replay, cancel, purge, stats, flushing a namespace, and pruning what
has expired.

Each takes the connection and the namespace; `SqliteBroker` and `SqliteStore` hand them to
the thread. Pruning is of every namespace: `prune` forgets expired states and values and old
channel messages a bounded chunk at a time, so no writer waits long behind it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time

from offload.brokers.base import DeadLetter, QueueStats
from offload.brokers.sqlite import queries
from offload.brokers.sqlite.connection import transaction

__all__ = ["EVENTS_KEEP_S", "PRUNE_CHUNK", "cancel", "dead_letters", "flush_broker", "flush_store", "prune", "purge", "replay", "stats"]

EVENTS_KEEP_S = 60.0  # channel messages older than this are pruned
PRUNE_CHUNK = 2000  # rows of one table one prune removes at most


def dead_letters(conn: sqlite3.Connection, ns: str, limit: int) -> list[DeadLetter]:
    return [DeadLetter(*row) for row in conn.execute(queries.DEAD_LETTERS, (ns, limit))]


def replay(conn: sqlite3.Connection, ns: str, ids: list[str] | None) -> list[DeadLetter]:
    with transaction(conn):
        if ids is None:
            rows = conn.execute(queries.REPLAY_ALL, (ns,)).fetchall()
        else:
            rows = []
            for i in ids:
                rows += conn.execute(queries.REPLAY_ONE, (ns, i)).fetchall()
    rows.sort(key=lambda r: r[4])
    return [DeadLetter(*row) for row in rows]


def cancel(conn: sqlite3.Connection, ns: str, message_id: str) -> bool:
    return conn.execute(queries.CANCEL, (ns, message_id)).rowcount > 0


def purge(conn: sqlite3.Connection, ns: str, queue: str) -> int:
    return conn.execute(queries.PURGE, (ns, queue)).rowcount


def stats(conn: sqlite3.Connection, ns: str) -> QueueStats:
    now = time.time()
    # One read transaction, so the counts agree with each other.
    with contextlib.closing(conn.cursor()) as cur:
        cur.execute("BEGIN")
        try:
            ready = cur.execute(queries.COUNT_QUEUED, (ns, now)).fetchall()
            scheduled, running = cur.execute(queries.COUNT_SCHEDULED_AND_RUNNING, (now, ns)).fetchone()
            dead = cur.execute(queries.COUNT_DEAD, (ns,)).fetchone()[0]
        finally:
            cur.execute("COMMIT")
    return QueueStats(
        queued={queue: count for queue, count, _ in ready}, scheduled=scheduled, running=running, dead=dead,
        oldest_age_s={queue: max(now - since, 0.0) for queue, _, since in ready},
    )


def flush_broker(conn: sqlite3.Connection, ns: str) -> None:
    """Remove the namespace's messages and dead letters."""
    with transaction(conn):
        conn.execute(queries.FLUSH_MESSAGES, (ns,))
        conn.execute(queries.FLUSH_DEAD_LETTERS, (ns,))


def flush_store(conn: sqlite3.Connection, ns: str) -> None:
    """Remove the namespace's states, channel messages and values."""
    with transaction(conn):
        for sql in (queries.FLUSH_STATES, queries.FLUSH_EVENTS, queries.FLUSH_VALUES):
            conn.execute(sql, (ns,))


def prune(conn: sqlite3.Connection, now: float) -> bool:
    """Forget expired states and values and old channel messages, of every namespace, up to
    `PRUNE_CHUNK` rows of each. True when there was more."""
    more = False
    for sql, cutoff in ((queries.PRUNE_STATES, now), (queries.PRUNE_VALUES, now), (queries.PRUNE_EVENTS, now - EVENTS_KEEP_S)):
        more |= conn.execute(sql, (cutoff, PRUNE_CHUNK)).rowcount == PRUNE_CHUNK
    return more
