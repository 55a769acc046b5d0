"""Opening the database file: its path from the URL, the connection's settings, the schema.

How several processes share one file and stay correct and fast:

* WAL journal, ``synchronous=NORMAL`` (a commit is durable across a process crash; a power cut
  may lose the last commits but never corrupts) and a 10 s busy timeout;
* claims are made by one UPDATE statement (atomic, so two consumers never get the same row)
  and every other read-then-write is done in one short `transaction` (``BEGIN IMMEDIATE``),
  so "database is locked" does not surface;
* the switch to WAL and the schema's creation, which can report "locked" at once when several
  processes open a new file together, are retried within the busy timeout.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import TypeVar

from offload.brokers.sqlite import queries
from offload.config import BrokerURL
from offload.errors import BrokerError, ConfigError
from offload.retrying import Backoff, retry_within_sync

__all__ = ["BUSY_TIMEOUT_S", "MMAP_SIZE", "SCHEMA_VERSION", "add_history_columns", "connect", "database_path", "transaction"]

T = TypeVar("T")

# 2: kv_expiry; 3: the history's columns and indexes. Every statement of the schema is
# idempotent, so upgrading is re-running them (after `add_history_columns`).
SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 10.0
MMAP_SIZE = 256 * 1024 * 1024  # address space, not memory


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


def connect(path: str) -> sqlite3.Connection:
    """A connection to the file, in WAL mode with the schema in place; the directory is created
    if missing."""
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


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, committed on success and rolled back on any error."""
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


def add_history_columns(conn: sqlite3.Connection) -> None:
    """Give a states table made before schema 3 the history's columns (ADD COLUMN is the one
    change the schema cannot make idempotently itself). Its states stay unlisted."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(states)")}
    if columns and "queued_at" not in columns:
        for column, kind in (("status", "TEXT"), ("name", "TEXT"), ("queue", "TEXT"), ("queued_at", "REAL")):
            conn.execute(f"ALTER TABLE states ADD COLUMN {column} {kind}")


def _create_schema(conn: sqlite3.Connection) -> None:
    def create() -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise BrokerError(f"{conn} was created by a newer offload (schema {version} > {SCHEMA_VERSION})")
        with transaction(conn):
            # Another process may have created it while we waited for the lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
            add_history_columns(conn)
            for statement in queries.SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    _retry_locked(create)
