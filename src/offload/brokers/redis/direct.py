"""Blocking Redis access for the sync face: `delay()` and `get()` talk to Redis from the caller's
own thread with redis-py's sync client, instead of hopping to offload's event loop and back.

It runs the same enqueue script as `RedisBroker`, so a message sent here is indistinguishable
from one sent by the async face. Waiting for a result needs no pub/sub connection: the store
puts each final state in ``done:<id>`` for a while, and a waiter blocks on it with BLMOVE from
the list onto itself, which returns the state and leaves it there for the next waiter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from offload.brokers.base import Direct, OutgoingMessage
from offload.brokers.redis.argv import enqueue_args, text
from offload.brokers.redis.connection import (
    MAX_CONNECTIONS,
    OPERATION_TIMEOUT_S,
    RETRIES,
    connection_kwargs,
    sent_directly_failed,
    translate,
)
from offload.brokers.redis.keys import Keys
from offload.brokers.redis.scripts import source
from offload.config import BrokerURL

__all__ = ["RedisDirect"]

_T = TypeVar("_T")
# A blocked BLMOVE must end well before the socket timeout cuts it.
_BLOCK_SLACK_S = 5.0


class RedisDirect(Direct):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self._masked = url.masked
        self._names = Keys.of(namespace)
        self._keys = [self._names.prefix]
        kwargs = connection_kwargs(url, namespace)
        kwargs["connection_class"] = redis.SSLConnection if url.scheme == "rediss" else redis.Connection
        pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call, unused-ignore]
            max_connections=int(url.param_float("max_connections", MAX_CONNECTIONS)),
            timeout=OPERATION_TIMEOUT_S,
            socket_timeout=OPERATION_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
            **kwargs,
        )
        self._client = redis.Redis(connection_pool=pool)
        self._enqueue = self._client.register_script(source("enqueue"))

    def _run(self, op: Callable[[], _T]) -> _T:
        try:
            return op()
        except (RedisError, TimeoutError) as e:
            raise translate(self._masked, e) from e

    def _command(self, command: Sequence[Any], usual: Callable[[], _T]) -> _T:
        """``command`` on a pooled connection, without the client's layers around each command
        (retry wrapper, metrics hooks: about a third of a call's CPU in the caller's thread).
        Anything unusual takes the ``usual`` path, which reconnects, retries and loads scripts."""
        pool = self._client.connection_pool
        try:
            conn = pool.get_connection()
        except (RedisError, OSError):
            return self._run(usual)
        try:
            conn.send_packed_command(conn.pack_command(*command), check_health=False)  # type: ignore[no-untyped-call, unused-ignore]
            return cast("_T", conn.read_response())
        except (RedisError, TimeoutError) as e:
            error = sent_directly_failed(self._masked, e)
            if error is not None:
                raise error from e
        finally:
            pool.release(conn)
        return self._run(usual)

    def enqueue(self, message: OutgoingMessage) -> str:
        args = enqueue_args(message)
        command = ("EVALSHA", self._enqueue.sha, len(self._keys), *self._keys, *args)
        return text(self._command(command, lambda: self._enqueue(keys=self._keys, args=args)))

    def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        keys = [self._names.state(t) for t in task_ids]
        return self._command(("MGET", *keys), lambda: cast("list[bytes | None]", self._client.mget(keys)))

    def wait_final(self, task_id: str, timeout_s: float) -> bytes | None:
        done = self._names.done(task_id)
        # Seconds with decimals (0 would mean forever); kept within the socket timeout, so a
        # long wait is several calls.
        timeout = min(max(round(timeout_s, 3), 0.001), OPERATION_TIMEOUT_S - _BLOCK_SLACK_S)
        command = ("BLMOVE", done, done, "LEFT", "LEFT", timeout)
        # The server takes seconds with decimals; redis-py annotates the timeout as int.
        return self._command(command, lambda: cast("bytes | None", self._client.blmove(done, done, timeout, "LEFT", "LEFT")))  # type: ignore[arg-type, unused-ignore]

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
