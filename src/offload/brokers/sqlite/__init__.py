"""``sqlite:///path/to/file.db``: the default, embedded backend. One machine, many processes,
no server.

``sqlite:///offload.db`` is relative to the working directory (resolved once, when the broker
is built), ``sqlite:////var/lib/app/offload.db`` is absolute; the directory is created if
missing. ``?visibility_timeout=<seconds>`` sets the lease.

A module per concern, each telling its own part of how the backend stays correct and fast
with several processes on one file:

* `connection`: the file's path, WAL and the other settings, the schema, transactions;
* `database`: the one connection per file and process, its thread, batched calls, forks;
* `queries`: the SQL, kept in ``queries.sql``;
* `broker`: the queues (`SqliteBroker`): row states, claims, leases;
* `store`: task states and watches, channels, key-value (`SqliteStore`);
* `admin`: dead letters, replay, cancel, purge, stats, flush, pruning;
* `notify`: wake-ups across processes, so that waiting never polls.
"""

from __future__ import annotations

from offload.brokers.base import Broker, Store
from offload.brokers.sqlite.broker import SqliteBroker
from offload.brokers.sqlite.connection import database_path
from offload.brokers.sqlite.store import SqliteStore
from offload.config import BrokerURL

__all__ = ["SqliteBroker", "SqliteStore", "database_path", "make_broker", "make_store"]


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return SqliteBroker(url, namespace)


def make_store(url: BrokerURL, namespace: str) -> Store:
    return SqliteStore(url, namespace)
