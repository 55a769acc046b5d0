"""Backends by URL scheme: the one table of them, and the one place that opens them.

A backend is a package (or a module, for memory://) providing ``make_broker(url, namespace)``
and, when it can keep results, ``make_store``; with a blocking face for sync callers,
``make_direct``. Only that package imports its client library. Adding a backend is its folder
and one entry in `KINDS`.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass

from offload.brokers.base import Broker, Direct, Store
from offload.config import BrokerURL
from offload.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BackendKind:
    """What a scheme's backend is, known without importing it (its client may be missing)."""

    package: str
    #: The `offload[...]` extra that installs its client library; None when it needs none.
    extra: str | None
    #: The URL parameters it reads: any other is refused, so a misspelt one is never ignored.
    params: frozenset[str]


# Every broker leases its messages, except RabbitMQ, which holds a delivery until its ack.
_LEASED = frozenset({"visibility_timeout"})
_REDIS = _LEASED | {"max_connections"}
_AMQP = frozenset({"connect_timeout", "publish_timeout", "prefetch"})

KINDS: dict[str, BackendKind] = {
    "memory": BackendKind("offload.brokers.memory", None, _LEASED),
    "sqlite": BackendKind("offload.brokers.sqlite", None, _LEASED),
    "redis": BackendKind("offload.brokers.redis", "redis", _REDIS),
    "rediss": BackendKind("offload.brokers.redis", "redis", _REDIS | {"ssl_cert_reqs", "ssl_ca_certs"}),
    "amqp": BackendKind("offload.brokers.amqp", "amqp", _AMQP),
    "amqps": BackendKind("offload.brokers.amqp", "amqp", _AMQP | {"cafile", "certfile", "keyfile"}),
}
#: The URL parameters each scheme accepts (from `KINDS`).
URL_PARAMS: dict[str, frozenset[str]] = {scheme: kind.params for scheme, kind in KINDS.items()}


def _package(url: BrokerURL) -> types.ModuleType:
    kind = KINDS.get(url.scheme)
    if kind is None:
        raise ConfigError(f"unknown broker scheme {url.scheme!r} in {url.masked}; use one of {', '.join(sorted(KINDS))}")
    try:
        return importlib.import_module(kind.package)
    except ImportError as e:
        hint = f": pip install 'offload[{kind.extra}]'" if kind.extra else ""
        raise ConfigError(f"the {url.scheme}:// backend cannot be loaded ({e}){hint}") from None


def check_url(url: BrokerURL) -> None:
    """Raise ConfigError for an unknown scheme, a backend that cannot be loaded, or a URL
    parameter this kind does not read (naming the ones it does)."""
    _package(url)
    accepted = KINDS[url.scheme].params
    unknown = sorted(set(url.params) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown URL parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {url.masked}; "
            f"{url.scheme}:// accepts {', '.join(sorted(accepted))}"
        )


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    broker: Broker = _package(url).make_broker(url, namespace)
    return broker


def check_stores_results(url: BrokerURL) -> None:
    """Raise ConfigError, saying what to add, when this kind of backend cannot keep results."""
    if getattr(_package(url), "make_store", None) is None:
        raise ConfigError(
            f"an {url.scheme}:// broker cannot store results: add results='redis://localhost:6379/0' "
            "(or results='sqlite:///offload.db') to Offload(...)"
        )


def make_store(url: BrokerURL, namespace: str) -> Store:
    check_stores_results(url)
    store: Store = _package(url).make_store(url, namespace)
    return store


def make_direct(url: BrokerURL, namespace: str) -> Direct | None:
    """The backend's blocking face for sync callers, or None when it has none."""
    factory = getattr(_package(url), "make_direct", None)
    return None if factory is None else factory(url, namespace)


@dataclass(slots=True)
class Backends:
    """A connected broker and the store that keeps its tasks' results."""

    broker: Broker
    store: Store

    async def close(self) -> None:
        await self.broker.close()
        await self.store.close()


async def open_backends(broker_url: BrokerURL, results_url: BrokerURL, namespace: str,
                        heartbeat_timeout_s: float | None = None) -> Backends:
    """Make and connect the broker and its store, for the app and for tests alike.

    ``heartbeat_timeout_s`` is the lease of a leased broker unless its URL sets
    ``visibility_timeout``. The store
    connects first and is bound to the broker before it connects (a broker that keeps its
    dedup keys or first states in the store needs it then); a broker that cannot connect
    closes the store again. Raises `BrokerUnavailable` (URL masked) for a server that is down."""
    store = make_store(results_url, namespace)
    broker = make_broker(broker_url, namespace)
    if heartbeat_timeout_s is not None and "visibility_timeout" not in broker_url.params:
        broker.lease_s = heartbeat_timeout_s
    await store.connect()
    broker.bind_store(store)
    try:
        await broker.connect()
    except BaseException:
        await store.close()
        raise
    return Backends(broker, store)
