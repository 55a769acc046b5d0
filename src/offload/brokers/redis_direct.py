"""Blocking Redis access for the sync face: `delay()` and `get()` talk to Redis from the caller's
own thread with redis-py's sync client, instead of hopping to offload's event loop and back.

It runs the same enqueue script as `RedisBroker`, so a message sent here is indistinguishable
from one sent by the async face. Waiting for a result needs no pub/sub connection: the store
puts each final state in ``done:<id>`` for a while, and a waiter blocks on it with BLMOVE from
the list onto itself, which returns the state and leaves it there for the next waiter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from offload.brokers.base import Direct, OutgoingMessage
from offload.brokers.redis import (
    _LUA_COMMON,
    _LUA_ENQUEUE,
    _MAX_CONNECTIONS,
    _OPERATION_TIMEOUT_S,
    _RETRIES,
    _connection_kwargs,
    _s,
    _translate,
    enqueue_args,
)
from offload.config import BrokerURL

_T = TypeVar("_T")
# A blocked BLMOVE must end well before the socket timeout cuts it.
_BLOCK_SLACK_S = 5.0


class RedisDirect(Direct):
    def __init__(self, url: BrokerURL, namespace: str) -> None:
        self._masked = url.masked
        self._prefix = f"offload:{namespace}:"
        self._keys = [self._prefix]
        kwargs = _connection_kwargs(url, namespace)
        kwargs["connection_class"] = redis.SSLConnection if url.scheme == "rediss" else redis.Connection
        pool = redis.BlockingConnectionPool(
            max_connections=int(url.param_float("max_connections", _MAX_CONNECTIONS)),
            timeout=_OPERATION_TIMEOUT_S,
            socket_timeout=_OPERATION_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), _RETRIES),
            **kwargs,
        )
        self._client = redis.Redis(connection_pool=pool)
        self._enqueue = self._client.register_script(_LUA_COMMON + _LUA_ENQUEUE)

    def _run(self, op: Callable[[], _T]) -> _T:
        try:
            return op()
        except (RedisError, TimeoutError) as e:
            raise _translate(self._masked, e) from e

    def enqueue(self, message: OutgoingMessage) -> str:
        return _s(self._run(lambda: self._enqueue(keys=self._keys, args=enqueue_args(message))))

    def get_states(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        keys = [f"{self._prefix}state:{t}" for t in task_ids]
        return cast("list[bytes | None]", self._run(lambda: self._client.mget(keys)))

    def wait_final(self, task_id: str, timeout_s: float) -> bytes | None:
        done = f"{self._prefix}done:{task_id}"
        # Seconds with decimals (0 would mean forever); kept within the socket timeout, so a
        # long wait is several calls.
        timeout = min(max(round(timeout_s, 3), 0.001), _OPERATION_TIMEOUT_S - _BLOCK_SLACK_S)
        return cast("bytes | None", self._run(lambda: self._client.blmove(done, done, timeout, "LEFT", "LEFT")))

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
