"""``sqlite:///path/to/file.db``: the default, embedded backend. One machine, many processes,
no server.

``sqlite:///offload.db`` is relative to the working directory (resolved once, when the broker
is built), ``sqlite:////var/lib/app/offload.db`` is absolute; the directory is created if
missing. ``?visibility_timeout=<seconds>`` sets the lease.

How it stays correct and fast with several processes on one file:

* WAL journal, ``synchronous=NORMAL`` (a commit is durable across a process crash; a power cut
  may lose the last commits but never corrupts), a 10 s busy timeout, claims made by one
  UPDATE statement (atomic, so two consumers never get the same row) and every other
  read-then-write done in one short ``BEGIN IMMEDIATE`` transaction, so "database is locked"
  does not surface.
* Each process has one connection per file, used only by its own thread and shared by the
  brokers and stores on that file; coroutines hand it work and await the answer, so the event
  loop never blocks on the database. Calls of one kind that queue up together (enqueues,
  state writes, acks) are answered by one transaction.
* A message row is ready (0), scheduled (1: its ``visible_at`` is an eta or a retry delay) or
  leased (2: ``visible_at`` is when the lease runs out). A fetch claims, in one UPDATE, the
  best of the ready rows (a partial index in priority and arrival order) and of the rows
  whose ``visible_at`` has passed (a partial index by time): an expired lease is thus handed
  out again with its delivery count raised, which is the whole reaper, and a large backlog
  of delayed or running messages is never scanned.
* Waiting never polls tightly: `offload.brokers._notify` wakes waiters in every process when a
  queue, a task state or a channel changes; a fetch also wakes when its earliest scheduled row
  or lease falls due, and everything re-reads on a slow safety poll in case a wake-up was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue as queue_mod
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from offload import forks
from offload.brokers._notify import Notifier, open_notifier
from offload.brokers.base import Broker, DeadLetter, Delivery, OutgoingMessage, QueueStats, Store, Watch
from offload.brokers.signals import Listener
from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable, ConfigError
from offload.retrying import Backoff, retry_within_sync

__all__ = ["SqliteBroker", "SqliteStore", "database_path", "make_broker", "make_store"]

log = logging.getLogger("offload.brokers.sqlite")

T = TypeVar("T")

SCHEMA_VERSION = 2  # 2: kv_expiry; every statement below is idempotent, so upgrading is re-running them
BUSY_TIMEOUT_S = 10.0
MMAP_SIZE = 256 * 1024 * 1024  # address space, not memory
SAFETY_POLL_S = 1.0  # waiters re-read this often even without a wake-up
EVENTS_KEEP_S = 60.0  # channel messages older than this are pruned
_PRUNE_EVERY_S = 10.0
_PRUNE_AGAIN_S = 0.5
_PRUNE_CHUNK = 2000
_PROMOTE_EVERY_S = 0.5

READY, SCHEDULED, LEASED = 0, 1, 2

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        body BLOB NOT NULL,
        state INTEGER NOT NULL,
        visible_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        lease INTEGER,
        key TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages (namespace, id)",
    # A key is held while its message exists (queued, scheduled or running).
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages (namespace, key) WHERE key IS NOT NULL",
    # Ready rows in claim order: priority high to low, then arrival (the rowid ends each entry).
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (namespace, queue, priority DESC) WHERE state = 0",
    # Scheduled and leased rows by the time they fall due.
    "CREATE INDEX IF NOT EXISTS messages_due ON messages (namespace, queue, visible_at) WHERE state > 0",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        queue TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        died_at REAL NOT NULL,
        PRIMARY KEY (namespace, id)
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_time ON dead_letters (namespace, died_at)",
    """CREATE TABLE IF NOT EXISTS states (
        namespace TEXT NOT NULL,
        task_id TEXT NOT NULL,
        data BLOB NOT NULL,
        expires_at REAL,
        PRIMARY KEY (namespace, task_id)
    )""",
    "CREATE INDEX IF NOT EXISTS states_expiry ON states (expires_at) WHERE expires_at IS NOT NULL",
    # AUTOINCREMENT: a subscriber remembers the last seq it saw, so a seq must never be reused,
    # not even after every row was pruned.
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        channel TEXT NOT NULL,
        data BLOB NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_channel ON events (namespace, channel, seq)",
    "CREATE INDEX IF NOT EXISTS events_age ON events (created_at)",
    """CREATE TABLE IF NOT EXISTS kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        expires_at REAL,
        PRIMARY KEY (namespace, key)
    )""",
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL",
)


def database_path(url: BrokerURL) -> str:
    """The absolute file path of a ``sqlite://`` URL (one leading slash belongs to the URL)."""
    raw = url.path[1:] if url.path.startswith("/") else url.path
    if not raw:
        raise ConfigError(
            f"{url.masked}: no database file; write sqlite:///offload.db (relative to the working "
            "directory) or sqlite:////var/lib/app/offload.db (absolute)"
        )
    if raw == ":memory:" or raw.startswith("file:"):
        raise ConfigError(
            f"{url.masked}: an in-memory sqlite database cannot be shared between connections; "
            "use memory:// for a single process"
        )
    return os.path.abspath(raw)


# -- the connection thread -----------------------------------------------------------------

# Bumped in a forked child: a connection (and the thread that used it) never crosses a fork.
_fork_generation = 0
# Connections inherited across a fork are kept referenced, never closed nor collected in the
# child: closing one there could disturb the parent's locks and WAL.
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    global _fork_generation, _shared_lock
    _fork_generation += 1
    _shared_lock = threading.Lock()
    _inherited.extend(_shared.values())
    _shared.clear()


forks.after_fork(_after_fork_in_child)

_NOTHING: Any = object()
_MAX_GROUP = 256  # calls answered by one batched job at most


class _Job:
    """One call for the connection thread. A batched job's ``fn`` takes a list of the
    ``args[0]`` of consecutive calls to the same ``fn`` and returns one result per call."""

    __slots__ = ("args", "batched", "fn", "fut", "loop", "orphan")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop | None = None,
        fut: asyncio.Future[Any] | None = None,
        orphan: Callable[..., Any] | None = None,
        batched: bool = False,
    ) -> None:
        self.fn, self.args, self.loop, self.fut, self.orphan, self.batched = fn, args, loop, fut, orphan, batched


def _settle(db: _Database, answers: list[tuple[_Job, Any]], failed: bool) -> None:
    # On the caller's loop: one callback for every call answered by one job.
    for job, value in answers:
        fut = job.fut
        assert fut is not None
        if fut.cancelled():
            if job.orphan is not None and not failed:
                db.submit(job.orphan, value)
        elif failed:
            fut.set_exception(value)
        else:
            fut.set_result(value)


class _Database:
    """One connection to the file and the one thread that uses it.

    A lighter hop than `loop.run_in_executor`: a call is a job on a queue, and the answer
    comes back with a single `call_soon_threadsafe`. Consecutive calls of a batched kind
    (enqueues, state writes, acks from concurrent coroutines) share one transaction: one
    commit instead of one each.
    """

    def __init__(self, path: str, masked_url: str) -> None:
        self.path = path
        self.masked_url = masked_url
        self.conn: sqlite3.Connection | None = None
        self._open_error: BaseException | None = None
        self.users = 0  # handles sharing it (see _acquire_database)
        self.stopped = False
        self._jobs: queue_mod.SimpleQueue[_Job | None] = queue_mod.SimpleQueue()
        self._put_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"offload-sqlite:{os.path.basename(path)}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.conn = _connect(self.path)
        except BaseException as e:
            self._open_error = e
        carry: _Job | None = _NOTHING
        while True:
            job = self._jobs.get() if carry is _NOTHING else carry
            carry = _NOTHING
            if job is None:
                break
            group = [job]
            if job.batched:
                while len(group) < _MAX_GROUP:
                    try:
                        nxt = self._jobs.get_nowait()
                    except queue_mod.Empty:
                        break
                    if nxt is not None and nxt.batched and nxt.fn == job.fn:
                        group.append(nxt)
                    else:
                        carry = nxt  # keep the order of calls: it runs next
                        break
            self._run(group)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        # A call that raced with close() must not wait forever.
        left = [] if carry is _NOTHING or carry is None else [carry]
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue_mod.Empty:
                break
            if job is not None:
                left.append(job)
        self._answer(left, BrokerError(f"sqlite {self.path}: closed"), failed=True)

    def _run(self, group: list[_Job]) -> None:
        job = group[0]
        try:
            if self.conn is None:
                raise BrokerUnavailable(self.masked_url, str(self._open_error)) from self._open_error
            results = job.fn(self.conn, [j.args[0] for j in group]) if job.batched else [job.fn(self.conn, *job.args)]
        except BaseException as e:
            exc: BaseException = e
            if isinstance(e, sqlite3.Error):
                exc = BrokerError(f"sqlite {self.path}: {e}")
                exc.__cause__ = e
            self._answer(group, exc, failed=True)
            return
        self._answer(group, results, failed=False)

    def _answer(self, group: list[_Job], outcome: Any, *, failed: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any]]] = {}
        for i, job in enumerate(group):
            value = outcome if failed else outcome[i]
            if job.loop is None or job.fut is None:
                if failed:
                    log.error("sqlite %s: background job failed", self.path, exc_info=outcome)
                continue
            by_loop.setdefault(job.loop, []).append((job, value))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, self, answers, failed)
            except RuntimeError:  # the loop was closed meanwhile: nobody will take the results
                if not failed:
                    for job, value in answers:
                        if job.orphan is not None:
                            self.submit(job.orphan, value)

    def _put(self, job: _Job) -> None:
        # A job queued after the thread was told to stop would never be answered.
        with self._put_lock:
            if self.stopped:
                raise BrokerError(f"sqlite {self.path}: closed")
            self._jobs.put(job)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(conn, *args)`` on the thread without waiting for it."""
        with contextlib.suppress(BrokerError):
            self._put(_Job(fn, args))

    async def call(self, fn: Callable[..., T], *args: Any, orphan: Callable[[sqlite3.Connection, T], Any] | None = None) -> T:
        """Run ``fn(conn, *args)`` on the thread. When the caller is cancelled after the job
        ran, ``orphan(conn, result)`` undoes what nobody will receive (leased messages)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Job(fn, args, loop, fut, orphan))
        return await fut

    async def call_batched(self, fn: Callable[[sqlite3.Connection, list[Any]], list[T]], arg: Any) -> T:
        """Like `call`, for ``fn(conn, [arg, ...]) -> [result, ...]``: calls queued back to back
        are answered by one run of ``fn``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Job(fn, (arg,), loop, fut, None, batched=True))
        return await fut

    @property
    def open_failed(self) -> bool:
        return self._open_error is not None

    def stop(self) -> None:
        with self._put_lock:
            if not self.stopped:
                self.stopped = True
                self._jobs.put(None)

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        try:
            await self.call(_close)
        except BrokerError:
            pass  # it never opened, or is closed already
        finally:
            self.stop()


# One connection per file and process, shared by the brokers and stores that use it: one
# thread fewer contending for the GIL, and no connection discarding its page cache because
# its neighbour in the same process just committed.
_shared: dict[str, _Database] = {}
_shared_lock = threading.Lock()


def _acquire_database(path: str, masked_url: str) -> _Database:
    with _shared_lock:
        db = _shared.get(path)
        if db is None or db.stopped:
            db = _shared[path] = _Database(path, masked_url)
        db.users += 1
        return db


def _release_database(db: _Database) -> bool:
    """Drop one user; True when it was the last and the caller must close it."""
    with _shared_lock:
        db.users -= 1
        if db.users > 0:
            return False
        if _shared.get(db.path) is db:
            del _shared[db.path]
        return not db.stopped


def _discard_database(db: _Database) -> None:
    # It could not open the file: the next user gets a fresh attempt.
    with _shared_lock:
        if _shared.get(db.path) is db:
            del _shared[db.path]
    db.stop()


def _connect(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, cached_statements=512)
    try:
        _set_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        # Another process's commit makes this connection drop its page cache; with the file
        # mapped, reading the pages again costs no system calls.
        conn.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
        _create_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _retry_locked(fn: Callable[[], T]) -> T:
    # Switching to WAL and the first schema write can report "locked" at once, without the
    # busy handler, when another process is doing the same at the same moment.
    return retry_within_sync(BUSY_TIMEOUT_S, fn, _locked, _still_locked, Backoff(first_s=0.005, cap_s=0.1))


def _locked(e: BaseException) -> str | None:
    text = str(e)
    return text if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text) else None


def _still_locked(reason: str, e: BaseException) -> BaseException:
    return e  # the database's own error, as the busy handler would have raised it


def _set_wal(conn: sqlite3.Connection) -> None:
    def switch() -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
            if mode != "wal":
                # Not a lock (that raises): this file system or file cannot do WAL, and several
                # processes could not share the file safely and quickly without it.
                raise BrokerError(f"the sqlite journal cannot be switched to WAL here (it stays {mode!r})")

    _retry_locked(switch)


def _create_schema(conn: sqlite3.Connection) -> None:
    def create() -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise BrokerError(f"{conn} was created by a newer offload (schema {version} > {SCHEMA_VERSION})")
        with _transaction(conn):
            # Another process may have created it while we waited for the lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    _retry_locked(create)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front (waiting on the busy timeout), so a read in the
    # transaction can never turn into SQLITE_BUSY when it later writes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _Handle:
    """What a broker or a store holds: the file, its share of the connection, the notifier."""

    def __init__(self, url: BrokerURL) -> None:
        self.path = database_path(url)
        self.masked_url = url.masked
        self._db: _Database | None = None
        self._notifier: Notifier | None = None
        self._generation = _fork_generation
        self._lock = threading.Lock()

    def database(self) -> _Database:
        db = self._db
        if db is not None and not db.stopped and self._generation == _fork_generation:
            return db
        with self._lock:
            if self._generation != _fork_generation:
                self._db = None  # the parent's, kept alive in _inherited
                self._generation = _fork_generation
            if self._db is None or self._db.stopped:
                self._db = _acquire_database(self.path, self.masked_url)
            if self._notifier is None:
                self._notifier = open_notifier(self.path)
            return self._db

    @property
    def notifier(self) -> Notifier:
        if self._notifier is None:
            self.database()
        assert self._notifier is not None
        return self._notifier

    async def call(self, fn: Callable[..., T], *args: Any, orphan: Callable[[sqlite3.Connection, T], Any] | None = None) -> T:
        db = self.database()
        try:
            return await db.call(fn, *args, orphan=orphan)
        except BrokerUnavailable:
            if db.open_failed:
                _discard_database(db)  # the next call tries to open the file again
            raise

    async def call_batched(self, fn: Callable[[sqlite3.Connection, list[Any]], list[T]], arg: Any) -> T:
        db = self.database()
        try:
            return await db.call_batched(fn, arg)
        except BrokerUnavailable:
            if db.open_failed:
                _discard_database(db)
            raise

    async def connect(self) -> None:
        await self.call(_noop)

    async def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            notifier, self._notifier = self._notifier, None
        if db is not None and self._generation == _fork_generation and _release_database(db):
            await db.close()
        if notifier is not None:
            notifier.release()


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


# -- broker --------------------------------------------------------------------------------

_INSERT = (
    "INSERT INTO messages (namespace, id, queue, priority, body, state, visible_at, key) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_HOLDER = "SELECT id FROM messages WHERE namespace = ? AND key = ?"
_ROWS_PER_INSERT = 100


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_sql(n_rows: int) -> str:
    return _INSERT.replace("(?, ?, ?, ?, ?, ?, ?, ?)", ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n_rows))


@functools.lru_cache(maxsize=64)
def _claim_sql(n_queues: int) -> tuple[str, str, str, str]:
    """(promote, claim, claimed, next due) for fetching from this many queues; each is one statement,
    atomic on its own, so a fetch needs no explicit transaction."""
    marks = ", ".join("?" * n_queues)
    # Due scheduled rows and expired leases become ready.
    promote = f"UPDATE messages SET state = 0 WHERE namespace = ? AND queue IN ({marks}) AND state > 0 AND visible_at <= ?"
    # The candidates of each queue: its best ready rows (from the ready index, in order) and
    # its rows that fell due since the last promote (from the due index: usually none). The
    # best overall are among them: priority first, then the order the queues were given,
    # then arrival. Claiming a due row directly is what lets most fetches skip the promote.
    branches = " UNION ALL ".join(
        f"SELECT * FROM (SELECT seq, priority, {i} AS rank FROM messages "
        "WHERE namespace = ? AND queue = ? AND state = 0 ORDER BY priority DESC, seq LIMIT ?) "
        f"UNION ALL SELECT seq, priority, {i} AS rank FROM messages "
        "WHERE namespace = ? AND queue = ? AND state > 0 AND visible_at <= ?"
        for i in range(n_queues)
    )
    claim = (
        "UPDATE messages SET state = 2, visible_at = ?, deliveries = deliveries + 1, lease = ? WHERE seq IN ("
        f"SELECT seq FROM ({branches}) ORDER BY priority DESC, rank, seq LIMIT ?)"
    )
    # What this claim took (its random lease token), as one row: JSON for the small fields and
    # the bodies end to end. One row instead of one per message matters under load: each row
    # is a step that gives up the GIL, and getting it back from a busy event loop can take a
    # whole switch interval.
    claimed = (
        "SELECT json_group_array(json_array(seq, id, queue, deliveries, priority, length(body))), "
        "CAST(group_concat(body, '') AS BLOB) FROM messages "
        f"WHERE namespace = ? AND queue IN ({marks}) AND state > 0 AND visible_at = ? AND lease = ?"
    )
    # One min() per queue, so each is a single index probe.
    dues = " UNION ALL ".join(
        ["SELECT min(visible_at) AS due FROM messages WHERE namespace = ? AND queue = ? AND state > 0"] * n_queues
    )
    next_due = f"SELECT min(due) FROM ({dues})"
    return promote, claim, claimed, next_due


_UNCLAIM = (
    "UPDATE messages SET state = 0, deliveries = deliveries - 1, lease = NULL "
    "WHERE namespace = ? AND id = ? AND state = 2 AND lease = ?"
)
_ACK = "DELETE FROM messages WHERE namespace = ? AND id = ?"
_ACK_MANY = "DELETE FROM messages WHERE namespace = ? AND id IN (SELECT value FROM json_each(?))"
# The receipt is the lease token of the claim: a worker whose lease ran out, and whose
# message another worker now holds, can neither put it back nor extend the new lease.
_REQUEUE = (
    "UPDATE messages SET body = coalesce(?, body), state = ?, visible_at = ?, lease = NULL "
    "WHERE namespace = ? AND id = ? AND (? IS NULL OR lease = ?)"
)
_EXTEND = (
    "UPDATE messages SET visible_at = ? "
    "WHERE namespace = ? AND id = ? AND state = 2 AND (? IS NULL OR lease = ?)"
)


class SqliteBroker(Broker):
    writes_initial_state = True

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        super().__init__(url, namespace)
        self._h = _Handle(url)
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
            step = _ROWS_PER_INSERT * 8
            with _transaction(conn) if len(rows) > step or with_states else contextlib.nullcontext():
                for i in range(0, len(rows), step):
                    chunk = rows[i : i + step]
                    conn.execute(_insert_sql(len(chunk) // 8), chunk)
                self._put_first_states(conn, messages, holders, now)
        else:
            # Insert-or-find-the-holder must be one step, or the holder could be acked between
            # the two and a message silently dropped.
            with _transaction(conn):
                for i, m in enumerate(messages):
                    if conn.execute(_INSERT, self._row(m, now)).rowcount == 0 and m.key is not None:
                        found = conn.execute(_HOLDER, (self.namespace, m.key)).fetchone()
                        holders[i] = found[0] if found else m.id
                self._put_first_states(conn, messages, holders, now)
        # Also for scheduled messages: waiting fetches re-arm their timer on the eta.
        self._h.notifier.notify({self._topic(m.queue) for m in messages})
        return holders

    def _put_first_states(self, conn: sqlite3.Connection, messages: list[OutgoingMessage], holders: list[str], now: float) -> None:
        """The tasks' first states, in the enqueue's own transaction (never for a dedup loser)."""
        params = [
            v for m, holder in zip(messages, holders, strict=True) if m.state is not None and holder == m.id
            for v in (self.namespace, m.id, m.state, now + m.state_ttl_s if m.state_ttl_s else None)
        ]
        step = _STATES_PER_STATEMENT * 4
        for i in range(0, len(params), step):
            chunk = params[i : i + step]
            conn.execute(_put_states_sql(len(chunk) // 4), chunk)

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
                wait = min(left, SAFETY_POLL_S)
                if next_due is not None:
                    wait = min(wait, max(next_due - time.time(), 0.001))
                await listener.wait(wait)

    def _claim(self, conn: sqlite3.Connection, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        ns = self.namespace
        promote, claim, claimed, next_due = _claim_sql(len(queues))
        now = time.time()
        if now >= self._next_promote:
            # The claim sees due rows by itself; promoting them now and then only keeps that
            # set small when very many fall due at once (a crowd sharing one eta).
            conn.execute(promote, (ns, *queues, now))
            self._next_promote = now + _PROMOTE_EVERY_S
        until, token = now + self.lease_s, random.getrandbits(62)
        params: list[Any] = [until, token]
        for q in queues:
            params += (ns, q, limit, ns, q, now)
        params.append(limit)
        if conn.execute(claim, params).rowcount == 0:
            due = conn.execute(next_due, [v for q in queues for v in (ns, q)]).fetchone()[0]
            return [], due
        # A separate read is safe: until the lease runs out nobody but us touches these rows,
        # and a row someone else took meanwhile no longer carries our token.
        meta, bodies = conn.execute(claimed, (ns, *queues, until, token)).fetchone()
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
        with _transaction(conn):
            conn.executemany(_UNCLAIM, [(self.namespace, d.id, d.receipt) for d in deliveries])
        self._h.notifier.notify({self._topic(d.queue) for d in deliveries})

    # -- settle --------------------------------------------------------------------------
    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._h.call_batched(self._ack_rows, [d.id for d in deliveries])

    def _ack_rows(self, conn: sqlite3.Connection, calls: list[list[str]]) -> list[None]:
        # One statement for every id of every concurrent caller: one commit, and one trip
        # through the GIL instead of one per row.
        ids = [i for call in calls for i in call]
        if len(ids) == 1:
            conn.execute(_ACK, (self.namespace, ids[0]))
        else:
            conn.execute(_ACK_MANY, (self.namespace, json.dumps(ids)))
        return [None] * len(calls)

    async def _requeue(self, delivery: Delivery, body: bytes | None, delay_s: float) -> None:
        await self._h.call(self._requeue_row, delivery, body, delay_s)

    def _requeue_row(self, conn: sqlite3.Connection, d: Delivery, body: bytes | None, delay_s: float) -> None:
        state = SCHEDULED if delay_s > 0 else READY
        conn.execute(_REQUEUE, (body, state, time.time() + max(delay_s, 0.0), self.namespace, d.id, d.receipt, d.receipt))
        self._h.notifier.notify((self._topic(d.queue),))

    async def _extend(self, deliveries: Sequence[Delivery]) -> None:
        await self._h.call(self._extend_rows, list(deliveries))

    def _extend_rows(self, conn: sqlite3.Connection, deliveries: list[Delivery]) -> None:
        until = time.time() + self.lease_s
        rows = [(until, self.namespace, d.id, d.receipt, d.receipt) for d in deliveries]
        if len(rows) == 1:
            conn.execute(_EXTEND, rows[0])
            return
        with _transaction(conn):
            conn.executemany(_EXTEND, rows)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._h.call(self._dead_letter, delivery, reason)

    def _dead_letter(self, conn: sqlite3.Connection, d: Delivery, reason: str) -> None:
        with _transaction(conn):
            conn.execute(_ACK, (self.namespace, d.id))
            conn.execute(
                "INSERT OR REPLACE INTO dead_letters (namespace, id, queue, body, reason, died_at) VALUES (?, ?, ?, ?, ?, ?)",
                (self.namespace, d.id, d.queue, d.body, reason, time.time()),
            )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._h.call(self._dead_letters, limit)

    def _dead_letters(self, conn: sqlite3.Connection, limit: int) -> list[DeadLetter]:
        rows = conn.execute(
            "SELECT id, queue, body, reason, died_at FROM dead_letters WHERE namespace = ? ORDER BY died_at DESC LIMIT ?",
            (self.namespace, limit),
        )
        return [DeadLetter(*row) for row in rows]

    async def replay(self, ids: Sequence[str] | None = None) -> list[DeadLetter]:
        return await self._h.call(self._replay, None if ids is None else list(ids))

    def _replay(self, conn: sqlite3.Connection, ids: list[str] | None) -> list[DeadLetter]:
        returning = " RETURNING id, queue, body, reason, died_at"
        with _transaction(conn):
            if ids is None:
                rows = conn.execute("DELETE FROM dead_letters WHERE namespace = ?" + returning, (self.namespace,)).fetchall()
            else:
                rows = []
                for i in ids:
                    rows += conn.execute("DELETE FROM dead_letters WHERE namespace = ? AND id = ?" + returning, (self.namespace, i)).fetchall()
        rows.sort(key=lambda r: r[4])
        return [DeadLetter(*row) for row in rows]

    # -- management ----------------------------------------------------------------------
    async def cancel(self, message_id: str) -> bool:
        return await self._h.call(self._cancel, message_id)

    def _cancel(self, conn: sqlite3.Connection, message_id: str) -> bool:
        cur = conn.execute("DELETE FROM messages WHERE namespace = ? AND id = ? AND state != 2", (self.namespace, message_id))
        return cur.rowcount > 0

    async def purge(self, queue: str) -> int:
        return await self._h.call(self._purge, queue)

    def _purge(self, conn: sqlite3.Connection, queue: str) -> int:
        cur = conn.execute("DELETE FROM messages WHERE namespace = ? AND queue = ? AND state != 2", (self.namespace, queue))
        return cur.rowcount

    async def stats(self) -> QueueStats:
        return await self._h.call(self._stats)

    def _stats(self, conn: sqlite3.Connection) -> QueueStats:
        ns, now = self.namespace, time.time()
        # One read transaction, so the counts agree with each other.
        with contextlib.closing(conn.cursor()) as cur:
            cur.execute("BEGIN")
            try:
                queued = dict(cur.execute(
                    "SELECT queue, count(*) FROM messages WHERE namespace = ? AND state != 2 AND visible_at <= ? GROUP BY queue",
                    (ns, now),
                ).fetchall())
                scheduled, running = cur.execute(
                    "SELECT count(*) FILTER (WHERE state != 2 AND visible_at > ?), count(*) FILTER (WHERE state = 2) "
                    "FROM messages WHERE namespace = ?",
                    (now, ns),
                ).fetchone()
                dead = cur.execute("SELECT count(*) FROM dead_letters WHERE namespace = ?", (ns,)).fetchone()[0]
            finally:
                cur.execute("COMMIT")
        return QueueStats(queued=queued, scheduled=scheduled, running=running, dead=dead)

    async def due_within(self, queues: Sequence[str], within_s: float) -> bool:
        return await self._h.call(self._due_within, list(dict.fromkeys(queues)), within_s)

    def _due_within(self, conn: sqlite3.Connection, queues: list[str], within_s: float) -> bool:
        if not queues:
            return False
        # `state > 0` too: it lets the partial index of scheduled and leased rows serve the query.
        found = conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM messages WHERE namespace = ? AND queue IN ({', '.join('?' * len(queues))}) "
            "AND state > 0 AND state = ? AND visible_at <= ?)",
            (self.namespace, *queues, SCHEDULED, time.time() + within_s),
        ).fetchone()[0]
        return bool(found)

    async def flush_namespace(self) -> None:
        await self._h.call(self._flush)

    def _flush(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            conn.execute("DELETE FROM messages WHERE namespace = ?", (self.namespace,))
            conn.execute("DELETE FROM dead_letters WHERE namespace = ?", (self.namespace,))


# -- store ---------------------------------------------------------------------------------

_STATES_PER_STATEMENT = 100


# An expired row counts as absent: it only waits for the prune.
_PUT_STATE_IF_ABSENT = (
    "INSERT INTO states (namespace, task_id, data, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (namespace, task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at "
    "WHERE states.expires_at IS NOT NULL AND states.expires_at <= ?"
)


@functools.lru_cache(maxsize=_STATES_PER_STATEMENT)
def _put_states_sql(n_rows: int) -> str:
    # Many rows in one statement: one commit, one trip through the GIL for the batch.
    values = ", ".join(["(?, ?, ?, ?)"] * n_rows)
    return (
        f"INSERT INTO states (namespace, task_id, data, expires_at) VALUES {values} "
        "ON CONFLICT (namespace, task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at"
    )


_GET_STATE = "SELECT data FROM states WHERE namespace = ? AND task_id = ? AND (expires_at IS NULL OR expires_at > ?)"
_GET_STATES = (
    "SELECT task_id, data FROM states WHERE namespace = ? AND task_id IN (SELECT value FROM json_each(?)) "
    "AND (expires_at IS NULL OR expires_at > ?)"
)
_PUBLISH = "INSERT INTO events (namespace, channel, data, created_at) VALUES (?, ?, ?, ?)"
_READ_EVENTS = "SELECT seq, data FROM events WHERE namespace = ? AND channel = ? AND seq > ? ORDER BY seq LIMIT 500"
_SET_IF_ABSENT = (
    "INSERT INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
    "WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?"
)
_GET_VALUE = "SELECT value, expires_at FROM kv WHERE namespace = ? AND key = ?"
_PRUNE_STATES = "DELETE FROM states WHERE rowid IN (SELECT rowid FROM states WHERE expires_at <= ? LIMIT ?)"
_PRUNE_VALUES = "DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE expires_at <= ? LIMIT ?)"
_PRUNE_EVENTS = "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE created_at < ? LIMIT ?)"


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
        self._h = _Handle(url)
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
        """Forget expired states and values and old channel messages, of every namespace, a
        bounded chunk at a time so no writer waits long; come back soon if there was more."""
        now = time.time()
        more = False
        for sql, cutoff in ((_PRUNE_STATES, now), (_PRUNE_VALUES, now), (_PRUNE_EVENTS, now - EVENTS_KEEP_S)):
            more |= conn.execute(sql, (cutoff, _PRUNE_CHUNK)).rowcount == _PRUNE_CHUNK
        if more:
            self._next_prune = now + _PRUNE_AGAIN_S

    # -- task states ---------------------------------------------------------------------
    async def _put_states(self, states: Sequence[tuple[str, bytes]], ttl_s: float | None, final: Collection[str]) -> None:
        await self._h.call_batched(self._write_states, (list(states), ttl_s))

    def _write_states(
        self, conn: sqlite3.Connection, calls: list[tuple[list[tuple[str, bytes]], float | None]]
    ) -> list[None]:
        ns, now = self.namespace, time.time()
        params = [
            v for states, ttl_s in calls for task_id, data in states for v in (ns, task_id, data, now + ttl_s if ttl_s else None)
        ]
        step = _STATES_PER_STATEMENT * 4
        with _transaction(conn) if len(params) > step else contextlib.nullcontext():
            for i in range(0, len(params), step):
                chunk = params[i : i + step]
                conn.execute(_put_states_sql(len(chunk) // 4), chunk)
        self._h.notifier.notify({f"t:{ns}:{task_id}" for states, _ in calls for task_id, _ in states})
        self._maybe_prune(now)
        return [None] * len(calls)

    async def _put_states_if_absent(self, states: Sequence[tuple[str, bytes]], ttl_s: float | None) -> None:
        await self._h.call(self._write_states_if_absent, list(states), ttl_s)

    def _write_states_if_absent(self, conn: sqlite3.Connection, states: list[tuple[str, bytes]], ttl_s: float | None) -> None:
        ns, now = self.namespace, time.time()
        with _transaction(conn):
            for task_id, data in states:
                conn.execute(_PUT_STATE_IF_ABSENT, (ns, task_id, data, now + ttl_s if ttl_s else None, now))
        self._h.notifier.notify({f"t:{ns}:{task_id}" for task_id, _ in states})

    async def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        return await self._h.call(self._get_states, list(task_ids))

    def _get_states(self, conn: sqlite3.Connection, task_ids: list[str]) -> list[bytes | None]:
        ns, now = self.namespace, time.time()
        if len(task_ids) == 1:
            row = conn.execute(_GET_STATE, (ns, task_ids[0], now)).fetchone()
            return [row[0] if row else None]
        found = dict(conn.execute(_GET_STATES, (ns, json.dumps(task_ids), now)).fetchall())
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
        conn.execute(_PUBLISH, (self.namespace, channel, data, now))
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
                        await listener.wait(SAFETY_POLL_S)
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
        # One statement: inserts, or replaces a row whose TTL ran out, or changes nothing.
        cur = conn.execute(_SET_IF_ABSENT, (self.namespace, key, value, now + ttl_s if ttl_s else None, now))
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
        row = conn.execute(_GET_VALUE, (self.namespace, key)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return bytes(row[0])

    async def delete_value(self, key: str) -> None:
        await self._h.call(self._delete_value, key)

    def _delete_value(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (self.namespace, key))

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return await self._h.call(self._incr, key, amount, ttl_s)

    def _incr(self, conn: sqlite3.Connection, key: str, amount: int, ttl_s: float | None) -> int:
        now = time.time()
        with _transaction(conn):
            row = conn.execute(_GET_VALUE, (self.namespace, key)).fetchone()
            alive = row is not None and (row[1] is None or row[1] > now)
            if alive:
                value, until = int(bytes(row[0]) or b"0") + amount, row[1]
            else:
                value, until = amount, (now + ttl_s if ttl_s else None)
            conn.execute(
                "INSERT OR REPLACE INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?)",
                (self.namespace, key, str(value).encode(), until),
            )
        self._maybe_prune(now)
        return value

    async def flush_namespace(self) -> None:
        await self._h.call(self._flush)

    def _flush(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            for table in ("states", "events", "kv"):
                conn.execute(f"DELETE FROM {table} WHERE namespace = ?", (self.namespace,))


def _last_event_seq(conn: sqlite3.Connection) -> int:
    # Every row committed later has a higher seq (AUTOINCREMENT, writes are serialised).
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])


def _read_events(conn: sqlite3.Connection, ns: str, channel: str, after: int) -> list[tuple[int, bytes]]:
    return conn.execute(_READ_EVENTS, (ns, channel, after)).fetchall()


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return SqliteBroker(url, namespace)


def make_store(url: BrokerURL, namespace: str) -> Store:
    return SqliteStore(url, namespace)
