"""What every peer module provides, and the counter that the drain task increments.

The drain task of every library runs the same body: ``INCR`` a counter in Redis, and stamp the
wall-clock time of the first and of the n-th increment. The drain rate is taken from those two
stamps, so neither worker start-up nor the driver's polling is counted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import redis
import redis.asyncio

T = TypeVar("T")

#: The queue (or queue-like name) every library consumes. Each library has its own Redis
#: database, so the same name never collides; on RabbitMQ it is deleted after the run.
QUEUE = "peersbench"
COUNTER = "peersbench:counter"
FIRST = "peersbench:first"
LAST = "peersbench:last"


@dataclass(frozen=True, slots=True)
class Settings:
    """Where one library's run connects. ``redis_url`` holds its results and the counter."""

    broker: str  # "redis" or "amqp"
    broker_url: str
    redis_url: str

    @property
    def amqp(self) -> bool:
        return self.broker == "amqp"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(os.environ["PEERS_BROKER"], os.environ["PEERS_BROKER_URL"], os.environ["PEERS_REDIS_URL"])

    def env(self) -> dict[str, str]:
        return {"PEERS_BROKER": self.broker, "PEERS_BROKER_URL": self.broker_url, "PEERS_REDIS_URL": self.redis_url}


@functools.cache
def sync_client() -> redis.Redis:
    # One client per process, made on first use: in a prefork pool that is in the child, and
    # redis-py's pool reconnects by itself if it ever crosses a fork.
    return redis.Redis.from_url(os.environ["PEERS_REDIS_URL"])


_async_clients: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}


def async_client() -> redis.asyncio.Redis:
    # An asyncio client belongs to the loop it first ran on; a worker has one loop.
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = _async_clients[loop] = redis.asyncio.Redis.from_url(os.environ["PEERS_REDIS_URL"])
    return client


def count(n: int) -> int:
    """The drain task's body for sync workers."""
    value = int(sync_client().incr(COUNTER))
    if value == 1:
        sync_client().set(FIRST, repr(time.time()))
    elif value == n:
        sync_client().set(LAST, repr(time.time()))
    return value


async def acount(n: int) -> int:
    """The drain task's body for async workers."""
    client = async_client()
    value = int(await client.incr(COUNTER))
    if value == 1:
        await client.set(FIRST, repr(time.time()))
    elif value == n:
        await client.set(LAST, repr(time.time()))
    return value


class Peer(ABC):
    """The producer side of one library, and how to start its worker."""

    name: ClassVar[str]
    #: How its one worker process gets two cores' worth of concurrency.
    pool: ClassVar[str]
    #: How a round trip waits for the result.
    waiter: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def worker_argv(self, bindir: Path) -> list[str]:
        """The worker command; ``bindir`` holds the peers venv's scripts."""

    def reset(self) -> None:
        """Empty this library's queues outside Redis (its Redis database is flushed anyway)."""

    @abstractmethod
    def enqueue(self, count: int, n: int) -> None:
        """Send ``count`` drain tasks ``incr(n)``, one after another."""

    @abstractmethod
    def round_trips(self, count: int) -> list[float]:
        """``count`` sends of ``echo(i)``, each waiting for its result: milliseconds each."""

    def cleanup(self) -> None:
        """Remove what the run left outside Redis (RabbitMQ queues)."""

    def close(self) -> None:
        """Close the producer's connections."""


class AsyncPeer(Peer):
    """A library whose client is asyncio-only: its calls run on one private loop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def enqueue(self, count: int, n: int) -> None:
        self.run(self.aenqueue(count, n))

    def round_trips(self, count: int) -> list[float]:
        return self.run(self.around_trips(count))

    def close(self) -> None:
        self.run(self.aclose())
        self._loop.close()

    @abstractmethod
    async def aenqueue(self, count: int, n: int) -> None: ...

    @abstractmethod
    async def around_trips(self, count: int) -> list[float]: ...

    async def aclose(self) -> None:
        pass


def timed(fn: Any, count: int) -> list[float]:
    """Call ``fn(i)`` for i in range(count); the milliseconds each call took."""
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out
