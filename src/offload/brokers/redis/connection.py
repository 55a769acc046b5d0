"""Connections to Redis: clients built from the `BrokerURL`, the errors offload raises for
redis-py's, the bounded connect, and `Commands`, which runs every operation.

Commands reconnect with exponential backoff; no operation waits longer than
`OPERATION_TIMEOUT_S` for the server, retries included. A connect gives up after
`CONNECT_BUDGET_S` with `BrokerUnavailable`, naming the URL with its password masked.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from offload.config import BrokerURL
from offload.errors import BrokerError, BrokerUnavailable, ConfigError
from offload.retrying import Backoff, retry_within

__all__ = [
    "CONNECT_BUDGET_S",
    "MAX_CONNECTIONS",
    "OPERATION_TIMEOUT_S",
    "RETRIES",
    "Commands",
    "connect_bounded",
    "connection_kwargs",
    "pubsub_client",
    "reason",
    "sent_directly_failed",
    "translate",
]

_T = TypeVar("_T")

# connect(): give up after this long, so an unreachable server is an error, never a hang.
CONNECT_BUDGET_S = 3.0
# Commands: a dropped connection is retried with backoff 0.1, 0.2, 0.4, 0.8, then 1 s (about
# 5.5 s in all) before the caller sees BrokerUnavailable; enough to ride out a server restart
# or a failover without hiding a real outage for long.
RETRIES = 8
# No operation waits longer than this for the server, retries included. It replaces redis-py's
# socket_timeout, which wraps every write in a new task and costs about a quarter of a command's time.
OPERATION_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
# A peer that vanished without closing the connection is noticed by the kernel: unacknowledged
# writes give up after TCP_USER_TIMEOUT, idle connections are probed by keepalives.
_KEEPALIVE = {
    name: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000))
    if hasattr(socket, name)
}

# Errors that retrying cannot fix: the server answered, and said no.
_FINAL_CONNECT_ERRORS = (
    AuthenticationError,
    AuthorizationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    ResponseError,
)


def reason(e: BaseException) -> str:
    """The first line of an error's text, for a log line or an error message."""
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def translate(masked: str, e: Exception) -> Exception:
    """The offload error for a redis-py error, naming the masked URL. Callers raise it from e."""
    if isinstance(e, RedisConnectionError | RedisTimeoutError | TimeoutError):
        return BrokerUnavailable(masked, reason(e))
    return BrokerError(f"redis at {masked}: {reason(e)}")


def sent_directly_failed(masked: str, e: Exception) -> Exception | None:
    """After a command written and read on a connection directly (without the client's layers)
    failed: None when the client's usual path should take it over, which loads a lost script
    and reconnects a cut connection; else the error to raise. A timeout is not tried again: it
    has had its time. redis-py's Connection drops itself on any failure while sending or
    reading (a cancellation too), so no late reply can reach the next command."""
    if isinstance(e, NoScriptError | RedisConnectionError):
        return None
    return translate(masked, e)


def connection_kwargs(url: BrokerURL, namespace: str) -> dict[str, Any]:
    """What every connection pool of this URL is built with (sync or async)."""
    db_text = url.path.strip("/") or "0"
    try:
        db = int(db_text)
    except ValueError:
        raise ConfigError(f"{url.masked}: the path must be a database number, like /0") from None
    kwargs: dict[str, Any] = {
        "host": url.host or "localhost",
        "port": url.port or 6379,
        "db": db,
        "username": url.username,
        "password": url.password,
        "socket_connect_timeout": CONNECT_BUDGET_S,
        "socket_keepalive": True,
        "socket_keepalive_options": {getattr(socket, name): value for name, value in _KEEPALIVE.items()},
        "client_name": f"offload:{namespace}",
        "connection_class": Connection,
    }
    if url.scheme == "rediss":
        kwargs["connection_class"] = SSLConnection
        cert_reqs = url.params.get("ssl_cert_reqs", "required")
        if cert_reqs not in ("none", "optional", "required"):
            raise ConfigError(f"{url.masked}: ssl_cert_reqs must be none, optional or required")
        kwargs["ssl_cert_reqs"] = cert_reqs
        if "ssl_ca_certs" in url.params:
            kwargs["ssl_ca_certs"] = url.params["ssl_ca_certs"]
    return kwargs


class Commands:
    """Runs operations on one dedicated connection while it is free, on a pool when it is not.

    A worker or a web request usually has one operation in flight; a dedicated connection
    skips the pool's bookkeeping on each of them. Bursts (many concurrent enqueues) overflow
    into a bounded pool instead of queueing behind one connection. Both reconnect with backoff.
    """

    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self.masked = url.masked
        common = connection_kwargs(url, namespace)
        common["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES)
        common["socket_timeout"] = None  # bounded by OPERATION_TIMEOUT_S instead
        max_connections = int(url.param_float("max_connections", MAX_CONNECTIONS))
        self.fast = Redis(connection_pool=ConnectionPool(max_connections=1, **common), single_connection_client=True)
        self.pool = Redis.from_pool(BlockingConnectionPool(max_connections=max_connections, timeout=None, **common))
        self._busy = False

    async def run(self, op: Callable[[Redis], Awaitable[_T]]) -> _T:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S):
                if self._busy:
                    return await op(self.pool)
                self._busy = True
                try:
                    return await op(self.fast)
                finally:
                    self._busy = False
        except (RedisError, TimeoutError) as e:
            raise translate(self.masked, e) from e

    async def script(self, script: AsyncScript, keys: list[str], args: Sequence[Any]) -> Any:
        conn = self.fast.connection
        if self._busy or conn is None or not conn.is_connected:
            return await self.run(lambda c: script(keys=keys, args=args, client=c))
        # The path of every task's claim and outcome: one EVALSHA written and read on the
        # dedicated connection, without the client's layers around each command (its lock,
        # retry wrapper and metrics hooks cost about a fifth of the call's CPU). Anything
        # unusual takes the usual path, which reconnects, retries and loads the script.
        self._busy = True
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S):
                await conn.send_packed_command(
                    conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args), check_health=False
                )
                return await conn.read_response()
        except (RedisError, TimeoutError) as e:
            error = sent_directly_failed(self.masked, e)
            if error is not None:
                raise error from e
        finally:
            self._busy = False
        return await self.run(lambda c: script(keys=keys, args=args, client=c))

    async def close(self) -> None:
        await self.fast.aclose(close_connection_pool=True)
        await self.pool.aclose()


def pubsub_client(url: BrokerURL, namespace: str) -> Redis:
    """The client of a pub/sub connection, also used to probe the server within the budget."""
    # No retries inside redis-py: the hub notices a drop itself, rebuilds the connection and
    # resubscribes, which redis-py's own reconnect would not do for raw SUBSCRIBE commands.
    # Its reads carry their own timeouts, so no socket_timeout (see OPERATION_TIMEOUT_S).
    pool = ConnectionPool(
        max_connections=8,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        **connection_kwargs(url, namespace),
    )
    return Redis.from_pool(pool)


async def connect_bounded(url: BrokerURL, attempt: Callable[[], Awaitable[None]]) -> None:
    """Run ``attempt`` until it succeeds, for at most CONNECT_BUDGET_S; then BrokerUnavailable."""

    async def once(left_s: float) -> None:
        try:
            await asyncio.wait_for(attempt(), left_s)
        except _FINAL_CONNECT_ERRORS as e:
            raise BrokerUnavailable(url.masked, reason(e)) from e

    def transient(e: BaseException) -> str | None:
        return reason(e) if isinstance(e, RedisError | OSError | TimeoutError) else None

    def give_up(why: str, e: BaseException) -> BaseException:
        error = BrokerUnavailable(url.masked, f"{why} (gave up after {CONNECT_BUDGET_S:g} s)")
        error.__cause__ = e
        return error

    # Pauses of 0.1, 0.2, 0.4... s: the budget, not a cap, ends them.
    await retry_within(CONNECT_BUDGET_S, once, transient, give_up, Backoff(first_s=0.1, cap_s=CONNECT_BUDGET_S))
