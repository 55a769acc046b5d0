"""``redis://[user:password@]host:port/db`` (and ``rediss://``): queues, results and events in Redis.

URL parameters: ``visibility_timeout`` (the lease, in seconds), ``max_connections`` (of each
pool), and for ``rediss://`` ``ssl_cert_reqs`` (none, optional, required) and ``ssl_ca_certs``.

Every key lives under ``offload:<namespace>:``; claiming and leasing are one atomic step in a
Lua script, and a delayed message waits in a schedule, never inside a lease. Only the current
holder of a lease may acknowledge, requeue or extend its message. A connection dropped
mid-call loses nothing: commands reconnect with backoff and every script is safe to run twice.

A module per concern:

* `connection`: clients from the URL, errors, the bounded connect, `Commands`;
* `scripts`: the Lua of ``lua/*.lua``, read once, and the handle that runs a script;
* `keys`: the names of the keys and channels (the table of them is in its docstring);
* `argv`: what the scripts take and what their replies mean;
* `broker`: the queues (`RedisBroker`): claims, leases, acks, the fetch that waits;
* `wakeups`: how a waiting fetch is woken or handed a message, without polling;
* `pubsub`: the one pub/sub connection of a broker or store object, rebuilt when it drops;
* `store`: task states and watches, channels, key-value (`RedisStore`);
* `admin`: dead letters, replay, cancel, purge, stats, flush;
* `direct`: the blocking face for sync callers (`RedisDirect`).
"""

from __future__ import annotations

from offload.brokers.base import Broker, Direct, Store
from offload.brokers.redis.broker import RedisBroker
from offload.brokers.redis.direct import RedisDirect
from offload.brokers.redis.store import RedisStore
from offload.config import BrokerURL

__all__ = ["RedisBroker", "RedisDirect", "RedisStore", "make_broker", "make_direct", "make_store"]


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return RedisBroker(url, namespace)


def make_store(url: BrokerURL, namespace: str) -> Store:
    return RedisStore(url, namespace)


def make_direct(url: BrokerURL, namespace: str) -> Direct:
    return RedisDirect(url, namespace)
