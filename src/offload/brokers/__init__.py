"""Backends by URL scheme. Each module imports its own client library, and only it does."""

from __future__ import annotations

import importlib

from offload.brokers.base import Broker, Direct, Store
from offload.config import BrokerURL
from offload.errors import ConfigError

_MODULES = {
    "memory": "offload.brokers.memory",
    "sqlite": "offload.brokers.sqlite",
    "redis": "offload.brokers.redis",
    "rediss": "offload.brokers.redis",
    "amqp": "offload.brokers.amqp",
    "amqps": "offload.brokers.amqp",
}
_EXTRAS = {"redis": "redis", "rediss": "redis", "amqp": "amqp", "amqps": "amqp"}

# The URL parameters each kind reads (its module's ``url.params`` and ``param_float`` calls),
# in one place: any other parameter is refused, so a misspelt one cannot be ignored silently.
_LEASED = frozenset({"visibility_timeout"})
_REDIS = _LEASED | {"max_connections"}
_AMQP = frozenset({"connect_timeout", "publish_timeout", "prefetch", "sync_connections"})  # no leases: no visibility_timeout
URL_PARAMS: dict[str, frozenset[str]] = {
    "memory": _LEASED,
    "sqlite": _LEASED,
    "redis": _REDIS,
    "rediss": _REDIS | {"ssl_cert_reqs", "ssl_ca_certs"},
    "amqp": _AMQP,
    "amqps": _AMQP | {"cafile", "certfile", "keyfile"},
}


def _module(url: BrokerURL):  # type: ignore[no-untyped-def]
    name = _MODULES.get(url.scheme)
    if name is None:
        raise ConfigError(f"unknown broker scheme {url.scheme!r} in {url.masked}; use one of {', '.join(sorted(_MODULES))}")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        extra = _EXTRAS.get(url.scheme)
        hint = f": pip install 'offload[{extra}]'" if extra else ""
        raise ConfigError(f"the {url.scheme}:// backend cannot be loaded ({e}){hint}") from None


def check_url(url: BrokerURL) -> None:
    """Raise ConfigError for an unknown scheme, a backend that cannot be loaded, or a URL
    parameter this kind does not read (naming the ones it does)."""
    _module(url)
    unknown = sorted(set(url.params) - URL_PARAMS[url.scheme])
    if unknown:
        known = ", ".join(sorted(URL_PARAMS[url.scheme]))
        raise ConfigError(
            f"unknown URL parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {url.masked}; "
            f"{url.scheme}:// accepts {known}"
        )


def make_broker(url: BrokerURL, namespace: str) -> Broker:
    return _module(url).make_broker(url, namespace)  # type: ignore[no-any-return]


def check_stores_results(url: BrokerURL) -> None:
    """Raise ConfigError, saying what to add, when this kind of backend cannot keep results."""
    if getattr(_module(url), "make_store", None) is None:
        raise ConfigError(
            f"an {url.scheme}:// broker cannot store results: add results='redis://localhost:6379/0' "
            "(or results='sqlite:///offload.db') to Offload(...)"
        )


def make_store(url: BrokerURL, namespace: str) -> Store:
    check_stores_results(url)
    return _module(url).make_store(url, namespace)  # type: ignore[no-any-return]


def make_direct(url: BrokerURL, namespace: str) -> Direct | None:
    """The backend's blocking face for sync callers, or None when it has none."""
    factory = getattr(_module(url), "make_direct", None)
    return None if factory is None else factory(url, namespace)
