"""arq: Redis only, asyncio only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from benchmarks.peers.base import QUEUE, AsyncPeer, Settings, acount

settings = Settings.from_env()
#: arq's worker polls its queue and job.result() polls for the result, both every 0.5 s by
#: default: that would measure the poll, not the library.
POLL_S = 0.005


async def incr(ctx: dict[str, Any], n: int) -> int:
    return await acount(n)


async def echo(ctx: dict[str, Any], x: int) -> int:
    return x


async def quiet_logs(ctx: dict[str, Any]) -> None:
    # arq's command logs two INFO lines per job and has no option to lower the level; every
    # other worker here logs warnings only.
    logging.getLogger("arq").setLevel(logging.WARNING)


class WorkerSettings:
    functions = [incr, echo]
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    queue_name = QUEUE
    on_startup = quiet_logs
    poll_delay = POLL_S
    # One event loop is one core whatever the number of jobs in flight; arq's default.
    max_jobs = 10


class ArqPeer(AsyncPeer):
    name = "arq"
    pool = f"asyncio, max_jobs={WorkerSettings.max_jobs}"
    waiter = f"job.result(poll_delay={POLL_S}); the worker's poll_delay={POLL_S} too"

    _pool: ArqRedis | None = None

    def worker_argv(self, bindir: Path) -> list[str]:
        return [str(bindir / "arq"), f"{__name__}.WorkerSettings"]

    async def redis(self) -> ArqRedis:
        if self._pool is None:
            self._pool = await create_pool(RedisSettings.from_dsn(self.settings.redis_url), default_queue_name=QUEUE)
        return self._pool

    async def aenqueue(self, count: int, n: int) -> None:
        pool = await self.redis()
        for _ in range(count):
            await pool.enqueue_job("incr", n)

    async def around_trips(self, count: int) -> list[float]:
        pool = await self.redis()
        out = []
        for i in range(count):
            t0 = self._loop.time()
            job = await pool.enqueue_job("echo", i)
            if job is None or await job.result(timeout=30, poll_delay=POLL_S) != i:
                raise AssertionError("echo returned something else")
            out.append((self._loop.time() - t0) * 1000)
        return out

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


PEER = ArqPeer
