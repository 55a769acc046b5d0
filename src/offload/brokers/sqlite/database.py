"""The database thread: each process has one connection per file, used only by its own thread
and shared by the brokers and stores on that file.

Coroutines hand the thread work and await the answer, so the event loop never blocks on the
database. Calls of one kind that queue up together (enqueues, state writes, acks) are answered
by one transaction. A connection, and the thread that used it, never crosses a fork: the child
opens its own on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue as queue_mod
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from offload import forks
from offload.brokers.sqlite.connection import connect, database_path
from offload.brokers.sqlite.notify import Notifier, open_notifier
from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable

__all__ = ["Database", "Handle", "noop"]

log = logging.getLogger("offload.brokers.sqlite")

T = TypeVar("T")

_NOTHING: Any = object()
_MAX_GROUP = 256  # calls answered by one batched job at most

# Bumped in a forked child: a connection (and the thread that used it) never crosses a fork.
_fork_generation = 0
# Connections inherited across a fork are kept referenced, never closed nor collected in the
# child: closing one there could disturb the parent's locks and WAL.
_inherited: list[object] = []


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


def _settle(db: Database, answers: list[tuple[_Job, Any]], failed: bool) -> None:
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


class Database:
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
            self.conn = connect(self.path)
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
_shared: dict[str, Database] = {}
_shared_lock = threading.Lock()


def _acquire_database(path: str, masked_url: str) -> Database:
    with _shared_lock:
        db = _shared.get(path)
        if db is None or db.stopped:
            db = _shared[path] = Database(path, masked_url)
        db.users += 1
        return db


def _release_database(db: Database) -> bool:
    """Drop one user; True when it was the last and the caller must close it."""
    with _shared_lock:
        db.users -= 1
        if db.users > 0:
            return False
        if _shared.get(db.path) is db:
            del _shared[db.path]
        return not db.stopped


def _discard_database(db: Database) -> None:
    # It could not open the file: the next user gets a fresh attempt.
    with _shared_lock:
        if _shared.get(db.path) is db:
            del _shared[db.path]
    db.stop()


def _after_fork_in_child() -> None:
    global _fork_generation, _shared_lock
    _fork_generation += 1
    _shared_lock = threading.Lock()
    _inherited.extend(_shared.values())
    _shared.clear()


forks.after_fork(_after_fork_in_child)


class Handle:
    """What a broker or a store holds: the file, its share of the connection, the notifier."""

    def __init__(self, url: BrokerURL) -> None:
        self.path = database_path(url)
        self.masked_url = url.masked
        self._db: Database | None = None
        self._notifier: Notifier | None = None
        self._generation = _fork_generation
        self._lock = threading.Lock()

    def database(self) -> Database:
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
        await self.call(noop)

    async def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            notifier, self._notifier = self._notifier, None
        if db is not None and self._generation == _fork_generation and _release_database(db):
            await db.close()
        if notifier is not None:
            notifier.release()


def noop(conn: sqlite3.Connection) -> None:
    """A job that does nothing: awaiting it opens the file, or waits for the jobs before it."""
    return None


def _close(conn: sqlite3.Connection) -> None:
    conn.close()
